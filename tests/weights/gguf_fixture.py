"""Write a small LLaMA as GGUF the way llama.cpp's converter does (q/k permuted to interleaved pairs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BYTE_CHARS: list[str] = []


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (the byte-level BPE alphabet)."""
    if not BYTE_CHARS:
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        extra = 0
        for b in range(256):
            if b in keep:
                BYTE_CHARS.append(chr(b))
            else:
                BYTE_CHARS.append(chr(256 + extra))
                extra += 1
    return BYTE_CHARS


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]


def tokens() -> list[str]:
    """4 control tokens, the 256 byte tokens, then one token per merge."""
    return SPECIALS + _byte_chars() + ["".join(m) for m in MERGES]


def llama_cpp_permute(w: Any, n_heads: int) -> Any:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute: HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: Any, path: Path, quant: str = "F32", chat_template: str | None = None, arch: str = "llama",
               pre: str = "smollm") -> Path:
    """``model`` (an HF LlamaForCausalLM) as a GGUF file; 2-D weights in ``quant`` (F32 or Q8_0);
    ``pre``: its tokenizer.ggml.pre."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    c = model.config
    w = GGUFWriter(str(path), arch=arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    toks = tokens()
    w.add_token_list(toks)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(toks) - len(SPECIALS)))
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        arr = t.detach().float().numpy()
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.weight"
        if name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, c.num_key_value_heads)
        arr = np.ascontiguousarray(arr)
        if arr.ndim == 2 and quant == "Q8_0":
            w.add_tensor(gname, quantize(arr, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(tie: bool, seed: int = 0) -> Any:
    """A random tiny LlamaForCausalLM over the fixture's vocabulary, q/k scaled for sharp attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokens()), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(15.0)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model
