"""Builds tiny random-weight MoE checkpoints with Hugging Face transformers and
records float64 reference outputs for them (the engine's correctness oracle).

Run where torch + transformers + safetensors exist:  python3 make_fixtures.py OUTDIR [arch ...]

A copy of ../shared/tools/make_fixtures.py. With no arch it makes the four shared fixtures,
exactly as the shared script does (same seeds, same order, same files). Added (issue 17), made
only when named:
  deepseek_v3          DeepseekV3ForCausalLM, 3 layers (layer 0 dense, first_k_dense_replace 1),
                       MLA with q_lora_rank 32, kv_lora_rank 24, qk_nope 12 != qk_rope 8,
                       v_head_dim 10 (!= qk_head_dim 20), 4 heads; 16 experts in 4 groups,
                       topk_group 2, top-4, routed_scaling_factor 2.5, norm_topk_prob, 1 shared
                       expert; YaRN (factor 4, original_max_position_embeddings 64, mscale 1,
                       mscale_all_dim 0.8, beta 32/1), so the cos/sin factor and the softmax
                       mscale both differ from 1 and positions 64..123 of the chunk case lie
                       beyond the original context; rope_interleave (the HF default).
  deepseek_v3_noqlora  the other branches: q_proj (q_lora_rank null), rope_interleave False,
                       default rope, n_group 1, norm_topk_prob False, routed_scaling_factor 1.5,
                       2 shared experts, every layer MoE (first_k_dense_replace 0), tied.
  glm4_moe             Glm4MoeForCausalLM (GLM-4.5 / 4.5-Air), 4 layers (layers 0-1 dense,
                       first_k_dense_replace 2), hidden 64, 4 heads / 2 kv heads, head_dim 24
                       (!= hidden / heads), partial rotary 0.5 (rotate-half on the first 12 dims),
                       attention_bias (q/k/v), use_qk_norm; 16 experts in 4 groups, topk_group 2,
                       top-4, routed_scaling_factor 2.5, norm_topk_prob, 1 shared expert, a random
                       correction bias; one MTP layer (num_nextn_predict_layers 1) when this
                       transformers builds it, so the checkpoint carries layer 4 for the
                       converter to skip.
  glm4_moe_noqknorm    the other branches: no q/k norm, 4 heads / 1 kv head, head_dim 16 (from
                       hidden / heads), n_group 1, norm_topk_prob False, routed_scaling_factor
                       1.5, 2 shared experts, layer 0 dense of 3, tied embeddings, no MTP.
The router's e_score_correction_bias is a buffer, which randomize() (parameters only) does not
touch: randomize_buffers() sets it from its own generator (positive, in [0, 0.3): selection
changes while sigmoid score + bias stays > 0, where every transformers version agrees on the
masked groups, whether it masks them with 0 or -inf). The new archs' reference.json also records
the smallest top-1/top-2 logit margin along each greedy trajectory.
"""
import json, os, sys, math
import torch
from safetensors.torch import save_file

OUT = sys.argv[1]
REBASE = os.environ.get("REBASE") == "1"
torch.manual_seed(1234)

def lt(n_layers, interval=4):
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]

def make(arch):
    if arch == "qwen3_5_moe":
        from transformers.models.qwen3_5_moe import Qwen3_5MoeTextConfig as C, Qwen3_5MoeForCausalLM as M
        cfg = C(vocab_size=1024, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=32,
                linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts_per_tok=4,
                num_experts=16, layer_types=lt(8), rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_theta": 10000000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
                max_position_embeddings=4096, eos_token_id=1, bos_token_id=None)
    elif arch == "qwen3_next":
        from transformers.models.qwen3_next import Qwen3NextConfig as C, Qwen3NextForCausalLM as M
        cfg = C(vocab_size=1024, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=32,
                linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts_per_tok=4,
                num_experts=16, norm_topk_prob=True, layer_types=lt(8), rms_norm_eps=1e-6,
                intermediate_size=128, tie_word_embeddings=False,
                rope_parameters={"rope_theta": 10000000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
                max_position_embeddings=4096, eos_token_id=1)
    elif arch == "qwen3_moe":
        from transformers.models.qwen3_moe import Qwen3MoeConfig as C, Qwen3MoeForCausalLM as M
        cfg = C(vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, moe_intermediate_size=32, num_experts_per_tok=4,
                num_experts=16, norm_topk_prob=True, intermediate_size=128, rms_norm_eps=1e-6,
                tie_word_embeddings=False, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
                max_position_embeddings=4096, eos_token_id=1)
    elif arch == "mixtral":
        from transformers.models.mixtral import MixtralConfig as C, MixtralForCausalLM as M
        cfg = C(vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, intermediate_size=64, num_experts_per_tok=2,
                num_local_experts=8, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
                max_position_embeddings=4096, eos_token_id=1)
    elif arch in ("deepseek_v3", "deepseek_v3_noqlora"):
        from transformers.models.deepseek_v3 import DeepseekV3Config as C, DeepseekV3ForCausalLM as M
        common = dict(vocab_size=1024, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                      kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                      n_routed_experts=16, moe_intermediate_size=16, intermediate_size=48,
                      rms_norm_eps=1e-6, attention_bias=False, eos_token_id=1, bos_token_id=0)
        if arch == "deepseek_v3":
            cfg = C(**common, num_hidden_layers=3, q_lora_rank=32, n_group=4, topk_group=2,
                    num_experts_per_tok=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                    n_shared_experts=1, first_k_dense_replace=1, tie_word_embeddings=False,
                    rope_interleave=True, max_position_embeddings=256,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 64, "mscale": 1.0,
                                     "mscale_all_dim": 0.8, "beta_fast": 32.0, "beta_slow": 1.0})
        else:
            cfg = C(**common, num_hidden_layers=2, q_lora_rank=None, n_group=1, topk_group=1,
                    num_experts_per_tok=3, routed_scaling_factor=1.5, norm_topk_prob=False,
                    n_shared_experts=2, first_k_dense_replace=0, tie_word_embeddings=True,
                    rope_interleave=False, max_position_embeddings=4096,
                    rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    elif arch in GLM_ARCHS:
        return make_glm(arch)
    else:
        raise SystemExit(arch)
    try:
        model = M._from_config(cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    except TypeError:
        cfg._experts_implementation = "eager"
        model = M._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    return cfg, model

GLM_ARCHS = ("glm4_moe", "glm4_moe_noqknorm")

def make_glm(arch):
    """GLM-4.5 fixtures (issue 17). Glm4MoeConfig reads partial_rotary_factor from
    rope_parameters in transformers 5 (default 0.5); it is given in both places."""
    from transformers.models.glm4_moe import Glm4MoeConfig as C, Glm4MoeForCausalLM as M
    rope = {"rope_type": "default", "partial_rotary_factor": 0.5}
    common = dict(vocab_size=1024, hidden_size=64, num_attention_heads=4, moe_intermediate_size=16,
                  intermediate_size=48, n_routed_experts=16, rms_norm_eps=1e-5, attention_bias=True,
                  hidden_act="silu", partial_rotary_factor=0.5, eos_token_id=1, bos_token_id=0,
                  pad_token_id=None)
    if arch == "glm4_moe":
        kw = dict(common, num_hidden_layers=4, num_key_value_heads=2, head_dim=24, use_qk_norm=True,
                  n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5,
                  norm_topk_prob=True, n_shared_experts=1, first_k_dense_replace=2,
                  tie_word_embeddings=False, max_position_embeddings=4096,
                  rope_parameters=dict(rope, rope_theta=1000000.0), num_nextn_predict_layers=1)
    else:
        kw = dict(common, num_hidden_layers=3, num_key_value_heads=1, use_qk_norm=False,
                  n_group=1, topk_group=1, num_experts_per_tok=3, routed_scaling_factor=1.5,
                  norm_topk_prob=False, n_shared_experts=2, first_k_dense_replace=1,
                  tie_word_embeddings=True, max_position_embeddings=4096,
                  rope_parameters=dict(rope, rope_theta=10000.0), num_nextn_predict_layers=0)
    def build(kw):
        cfg = C(**kw)
        try:
            model = M._from_config(cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
        except TypeError:
            cfg._experts_implementation = "eager"
            model = M._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        return cfg, model
    try:
        cfg, model = build(kw)
    except Exception as e:  # a transformers without MTP layers: the fixture goes without them
        if not kw.get("num_nextn_predict_layers"):
            raise
        print(f"{arch}: building with num_nextn_predict_layers=1 failed ({type(e).__name__}: {e}); without MTP")
        cfg, model = build(dict(kw, num_nextn_predict_layers=0))
    # What this transformers made of the config (the converter reads the saved config.json).
    try:
        print(arch, "head_dim", getattr(cfg, "head_dim", None), "rope_parameters", getattr(cfg, "rope_parameters", None),
              "partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None),
              "inv_freq", tuple(model.model.rotary_emb.inv_freq.shape), "layers", len(model.model.layers))
    except Exception as e:
        print(arch, "(config summary unavailable:", e, ")")
    return cfg, model

@torch.no_grad()
def randomize(model):
    g = torch.Generator().manual_seed(99)
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if "norm" in name:
            # keep each norm's own convention (zero-centred or one-centred) and perturb it
            p.add_(0.1 * torch.randn(shape, generator=g))
        elif "A_log" in name or "dt_bias" in name:
            p.add_(0.2 * torch.randn(shape, generator=g))
        elif "conv1d" in name:
            p.copy_(0.4 * torch.randn(shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(shape, generator=g))
        elif name.endswith("_proj.bias") and len(shape) == 1:
            # attention biases (GLM-4.5); no shared arch has them, so their output is unchanged
            p.copy_(0.5 * torch.randn(shape, generator=g))
        else:
            fan_in = shape[-1] if len(shape) >= 2 else 1
            scale = 1.0 / math.sqrt(fan_in)
            if name.endswith("gate.weight") and "proj" not in name:
                scale *= 4.0  # decisive routing: keep top-k away from ties
            p.copy_(scale * torch.randn(shape, generator=g))

@torch.no_grad()
def randomize_buffers(model):
    """Persistent buffers that are weights of the checkpoint but not parameters (DeepSeek-V3's
    e_score_correction_bias). A no-op for the four shared archs, so their output is unchanged."""
    g = torch.Generator().manual_seed(77)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.rand(tuple(b.shape), generator=g))

NEW_ARCHS = ("deepseek_v3", "deepseek_v3_noqlora") + GLM_ARCHS

CASES = {
    "single": [7],
    "short": [3, 17, 250, 999, 4, 4, 512],
    "chunk": [(i * 37 + 11) % 1024 for i in range(100)],
}

def run(arch):
    d = os.path.join(OUT, arch)
    os.makedirs(d, exist_ok=True)
    cfg, model = make(arch)
    M = type(model)
    if not REBASE:  # REBASE=1: keep the checkpoint on disk, recompute only the references
        randomize(model)
        randomize_buffers(model)
        model = model.to(torch.bfloat16)
        model.save_pretrained(d, safe_serialization=True)
    # The reference runs on the exact bf16 weights, upcast to float64, reloaded from disk so that
    # buffers (rotary inv_freq) are computed afresh as every loader does, not rounded to bf16.
    try:
        model = M.from_pretrained(d, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager")
    except TypeError:
        model = M.from_pretrained(d, dtype=torch.float64, attn_implementation="eager")
    model = model.eval()
    ref, meta = {}, {"arch": arch, "cases": {}, "note": "logits_<case>[t] is the next-token distribution after tokens[0..t]; hidden_<case>_<i> is HF output_hidden_states[i] (0 = embeddings)"}
    for cname, toks in CASES.items():
        ids = torch.tensor([toks], dtype=torch.long)
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        ref[f"tokens_{cname}"] = ids[0].to(torch.int32)
        ref[f"logits_{cname}"] = out.logits[0].to(torch.float32).contiguous()
        for i, h in enumerate(out.hidden_states):
            ref[f"hidden_{cname}_{i}"] = h[0].to(torch.float32).contiguous()
        if arch in NEW_ARCHS:
            res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
            gen = res.sequences
            margin = min(float(t[0] - t[1]) for t in (sc[0].topk(2).values for sc in res.scores))
        else:
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref[f"greedy_{cname}"] = gen[0, len(toks):].to(torch.int32).contiguous()
        meta["cases"][cname] = {"n_tokens": len(toks), "n_hidden": len(out.hidden_states), "greedy": gen[0, len(toks):].tolist()}
        if arch in NEW_ARCHS:
            import transformers
            meta["transformers_version"] = transformers.__version__
            meta["cases"][cname]["greedy_min_top2_margin"] = margin
            print(f"{arch} {cname}: greedy min top-2 margin {margin:.4f}")
    save_file(ref, os.path.join(d, "reference.safetensors"))
    json.dump(meta, open(os.path.join(d, "reference.json"), "w"), indent=1)
    from safetensors import safe_open
    names = []
    for f in sorted(os.listdir(d)):
        if f.startswith("model") and f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as sf:
                for k in sf.keys():
                    names.append(f"{k} {list(sf.get_slice(k).get_shape())} {sf.get_slice(k).get_dtype()}")
    open(os.path.join(d, "tensors.txt"), "w").write("\n".join(names) + "\n")
    first = next(iter(meta["cases"]))
    print(arch, "ok", len(names), "tensors; greedy(%s) =" % first, meta["cases"][first]["greedy"][:8])

for a in (sys.argv[2:] or ["qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral"]):
    run(a)
