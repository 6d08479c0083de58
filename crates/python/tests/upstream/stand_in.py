"""A pytest plugin that makes weightlift stand in for safetensors' native module, so that
safetensors' own Python test-suite (run from a copy fetched by ``run.sh``, never kept in this
repository) exercises weightlift's loading through safetensors' unchanged Python API.

Loaded with ``-p stand_in`` before any test imports safetensors: from then on
``safetensors.safe_open``, ``safetensors.torch.load_file`` & co. are weightlift's.
"""

import sys

import weightlift._safetensors_rust as _stand_in

sys.modules["safetensors._safetensors_rust"] = _stand_in

import safetensors  # noqa: E402

assert safetensors.safe_open is _stand_in.safe_open, "weightlift does not stand in"
