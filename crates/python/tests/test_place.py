"""``weightlift.load_into``: blocks of a checkpoint's tensors straight into torch tensors the
caller owns (fused experts, gate and up side by side, row and column blocks, conversions),
equal to what copying in memory gives; bad placements raise before anything is written. On a
machine with a GPU the same placements into CUDA tensors give the same bytes."""

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

import weightlift  # noqa: E402
from weightlift import SafetensorError  # noqa: E402

E, I, H = 4, 8, 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("place")
    tensors = {}
    for e in range(E):
        for part, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            tensors[f"experts.{e}.{part}.weight"] = torch.randn(shape).to(torch.bfloat16)
    tensors["qkv.weight"] = torch.randn(3 * H, H).to(torch.bfloat16)
    half = {k: v for i, (k, v) in enumerate(sorted(tensors.items())) if i % 2 == 0}
    rest = {k: v for k, v in tensors.items() if k not in half}
    save_file(half, str(d / "model-00001-of-00002.safetensors"))
    save_file(rest, str(d / "model-00002-of-00002.safetensors"))
    import json

    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in half}}
    index["weight_map"].update({k: "model-00002-of-00002.safetensors" for k in rest})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(d), tensors


def placements(device):
    gate_up = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=device)
    down = torch.empty(E, H, I, dtype=torch.float32, device=device)
    q = torch.empty(H, H, dtype=torch.bfloat16, device=device)
    kv_cols = torch.zeros(2 * H, 2 * H, dtype=torch.float32, device=device)
    out = []
    for e in range(E):
        out.append((f"experts.{e}.gate.weight", None, gate_up[e, :I]))
        out.append((f"experts.{e}.up.weight", None, gate_up[e, I:]))
        out.append((f"experts.{e}.down.weight", None, down[e]))
    out.append(("qkv.weight", (slice(0, H),), q))
    # Rows H..3H, columns 4..12, into a column block of a wider float32 matrix (strided).
    out.append(("qkv.weight", (slice(H, 3 * H), slice(4, 12)), kv_cols[:, 8:16]))
    return out, (gate_up, down, q, kv_cols)


def expected(tensors):
    gate_up = torch.stack(
        [torch.cat([tensors[f"experts.{e}.gate.weight"], tensors[f"experts.{e}.up.weight"]]) for e in range(E)]
    )
    down = torch.stack([tensors[f"experts.{e}.down.weight"] for e in range(E)]).float()
    q = tensors["qkv.weight"][:H]
    kv_cols = torch.zeros(2 * H, 2 * H)
    kv_cols[:, 8:16] = tensors["qkv.weight"][H:, 4:12].float()
    return gate_up, down, q, kv_cols


def check(ckpt, device):
    path, tensors = ckpt
    places, dests = placements(device)
    read, reads = weightlift.load_into(path, places)
    assert read > 0 and reads >= 2  # two files
    for got, want in zip(dests, expected(tensors)):
        assert got.dtype == want.dtype
        assert torch.equal(got.cpu(), want)


def test_fused_blocks_and_conversions_equal_copies_in_memory(ckpt):
    check(ckpt, "cpu")


def test_from_an_open_safe_open_too(ckpt):
    path, tensors = ckpt
    name = "experts.0.gate.weight"
    f = weightlift.safe_open(path + "/model.safetensors.index.json", framework="pt")
    dest = torch.empty(I, H, dtype=torch.bfloat16)
    weightlift.load_into(f, [(name, None, dest)])
    assert torch.equal(dest, load_file(path + "/model-00001-of-00002.safetensors").get(name, tensors[name]))


@pytest.mark.parametrize(
    "case, words, error",
    [
        ("shape", "the destination has shape", weightlift.InvalidPlacement),
        ("overlap", "overlaps", weightlift.InvalidPlacement),
        ("outside", "fall outside", weightlift.InvalidPlacement),
        ("step", "without steps", weightlift.InvalidPlacement),
        ("meta", "CPU and CUDA", weightlift.InvalidPlacement),
        ("missing", "nope", SafetensorError),
    ],
)
def test_bad_placements_raise_before_writing(ckpt, case, words, error):
    path, _ = ckpt
    name = "experts.1.gate.weight"
    base = torch.zeros(2 * I * H, dtype=torch.bfloat16)
    from weightlift._place import Block

    place = {
        "shape": lambda: [(name, None, base[: I * H].view(H, I))],
        "overlap": lambda: [
            (name, None, base[: I * H].view(I, H)),
            (name, None, base[8 : 8 + I * H].view(I, H)),
        ],
        # A block description past the end of its tensor's memory (torch refuses such views).
        "outside": lambda: [(name, None, Block(base, I * H + 8, [I, H], [H, 1]))],
        "step": lambda: [(name, (slice(0, I, 2),), base[: I * H // 2].view(I // 2, H))],
        "meta": lambda: [(name, None, torch.empty(I, H, dtype=torch.bfloat16, device="meta"))],
        "missing": lambda: [("nope", None, base[: I * H].view(I, H))],
    }[case]()
    with pytest.raises(error, match=words) as raised:
        weightlift.load_into(path, place)
    # Callers that catch safetensors' error keep catching it.
    assert isinstance(raised.value, SafetensorError)
    assert not base.any(), "nothing was written"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_destinations_get_the_same_bytes(ckpt):
    check(ckpt, "cuda:0")


@pytest.mark.parametrize("inverse", [False, True])
def test_interleaved_rows_in_one_placement(ckpt, inverse):
    """What transformers' ``Interleave(dim)`` makes of a tensor, read straight into place."""
    from weightlift._place import Block

    path, tensors = ckpt
    src = tensors["qkv.weight"]  # [3H, H]: rows interleaved along dim 0 of a [1, 3H, H] view
    n = src.shape[0]
    dest = torch.empty(1, n, H, dtype=torch.bfloat16)
    place = Block.of(dest[0]).interleaved(0, inverse=inverse)
    weightlift.load_into(path, [("qkv.weight", None, place)])
    parts = [2, n // 2] if inverse else [n // 2, 2]
    want = src.reshape(parts + [H]).transpose(0, 1).reshape(n, H)
    assert torch.equal(dest[0], want)
