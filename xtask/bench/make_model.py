"""Makes a random transformers model and saves it sharded: ``hf-moe``, ``hf-moe-large``
(Qwen3-30B-A3B's layout) or ``hf-dense`` (Llama), into the directory given."""

import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig
kind, path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if kind == "hf-moe-large":
    config = Qwen3MoeConfig(vocab_size=16384, hidden_size=512, intermediate_size=1024,
        moe_intermediate_size=160, num_hidden_layers=48, num_attention_heads=4,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        max_position_embeddings=2048)
elif kind == "hf-moe":
    config = Qwen3MoeConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2048,
        moe_intermediate_size=128, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=4, head_dim=128, num_experts=64, num_experts_per_tok=4,
        max_position_embeddings=2048)
else:
    config = LlamaConfig(vocab_size=16384, hidden_size=2048, intermediate_size=5632,
        num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8,
        max_position_embeddings=2048)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(path, max_shard_size="200MB")
