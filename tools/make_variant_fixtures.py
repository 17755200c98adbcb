"""Builds extra tiny random-weight MoE checkpoints ("variants") whose shapes differ
from the main fixtures (shared/tools/make_fixtures.py), and records float64
reference outputs for them with Hugging Face transformers.

Run where torch + transformers (5.x) + safetensors exist:
    python3 tools/make_variant_fixtures.py OUTDIR [variant ...]

Same recipe as make_fixtures.py: torch.manual_seed(1234), eager attention,
experts_implementation="eager", float32 init, randomize() (copied verbatim),
bf16 save_pretrained, then the reference runs on the exact bf16 values upcast to
float64.  Reference keys: tokens_<case>, logits_<case>, hidden_<case>_<i>,
greedy_<case> (24 greedy tokens, generate() with cache).  Each variant folder
also gets reference.json and tensors.txt.  Before the reference, every checkpoint
is reloaded with from_pretrained and checked: parameters bit-identical to the
saved bf16 values, buffers equal to a fresh float32 build's.  The reference is
computed on that reloaded checkpoint, not on the in-memory model: Module.to(bf16)
also rounds the non-persistent rotary inv_freq buffers to bf16, and upcasting
that model (as make_fixtures.py does) bakes bf16 RoPE frequencies into the
reference; the script prints how much that changes the chunk logits.
reference.json also records, per case, the smallest top-1/top-2 logit margin seen
along the greedy trajectory.

Variants:
  qwen3_5_moe_v2  Qwen3_5MoeForCausalLM, 5 layers [F,L,L,F,L], 6/2 heads, hd 16,
                  linear k-heads 2 / v-heads 6 (ratio 3), kdim 16, vdim 24, conv 3,
                  8 experts top-3, partial rotary 0.5, tied embeddings.
  qwen3_5_moe_vl  Qwen3_5MoeForConditionalGeneration (model_type "qwen3_5_moe",
                  nested text_config, vision tower saved), text-only reference.
  qwen3_next_v2   Qwen3NextForCausalLM, 4 layers [L,F,L,L], 4/1 heads, linear
                  k 1 / v 3, conv 2, 6 experts top-2, layer 2 dense MLP,
                  norm_topk_prob False, tied, partial rotary 0.25, theta 1e7.
  qwen3_moe_v2    Qwen3MoeForCausalLM, 3 layers (layer 1 dense), 6/2 heads, hd 8,
                  10 experts top-3, norm_topk_prob False, tied, theta 1e4.
  mixtral_v2      MixtralForCausalLM, 3 layers, 8/2 heads, hd 8, 6 experts top-3,
                  eps 1e-5, theta 1e6, untied.

Config adaptations (vs. the brief):
  * rope_theta / partial_rotary_factor are passed inside rope_parameters (the
    transformers 5 form, as make_fixtures.py does).
  * qwen3_5_moe_vl: the vision tower is shrunk beyond the brief's depth 1 /
    hidden 32 / intermediate 64 / heads 2 / out 48 with patch_size 4 and
    num_position_embeddings 64 (8x8 grid) to keep the checkpoint small; if the
    config class rejects those two, the class defaults (16 / 2304) are used and
    the fact is written to reference.json ("adaptations").  The text part's
    rope_parameters also carries mrope_section [2, 1, 1] (sums to rotary_dim/2
    = 4; the default [11, 11, 10] is meant for rotary_dim 64).  With text-only
    input all three M-RoPE position streams are equal, so it is plain RoPE.
  * mixtral_v2 keeps rms_norm_eps 1e-5 (as the brief's own entry says).
"""
import json, os, sys, math, traceback
import torch
from safetensors.torch import save_file

OUT = sys.argv[1]
torch.manual_seed(1234)


def rope(theta, partial=None, **extra):
    r = {"rope_theta": float(theta), "rope_type": "default"}
    if partial is not None:
        r["partial_rotary_factor"] = float(partial)
    r.update(extra)
    return r


def build_model(M, cfg):
    try:
        model = M._from_config(cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    except TypeError:
        cfg._experts_implementation = "eager"
        if hasattr(cfg, "text_config"):
            cfg.text_config._experts_implementation = "eager"
        model = M._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    return model


def make(variant, notes):
    """Returns (arch, cfg, model, M, vocab)."""
    if variant == "qwen3_5_moe_v2":
        from transformers.models.qwen3_5_moe import Qwen3_5MoeTextConfig as C, Qwen3_5MoeForCausalLM as M
        cfg = C(vocab_size=320, hidden_size=48, num_hidden_layers=5,
                layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention", "linear_attention"],
                num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=24,
                linear_conv_kernel_dim=3, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                shared_expert_intermediate_size=40, rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters=rope(1e6, 0.5), max_position_embeddings=2048, eos_token_id=1, bos_token_id=None)
        return "qwen3_5_moe", cfg, build_model(M, cfg), M, 320
    if variant == "qwen3_5_moe_vl":
        from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig as C, Qwen3_5MoeForConditionalGeneration as M
        text = dict(vocab_size=320, hidden_size=48, num_hidden_layers=4,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
                    num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                    linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=24,
                    linear_conv_kernel_dim=3, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                    shared_expert_intermediate_size=40, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    rope_parameters=rope(1e6, 0.5, mrope_section=[2, 1, 1], mrope_interleaved=True),
                    max_position_embeddings=2048, eos_token_id=1, bos_token_id=None)
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
                      patch_size=4, num_position_embeddings=64)
        try:
            cfg = C(text_config=dict(text), vision_config=dict(vision), tie_word_embeddings=False, eos_token_id=1)
            model = build_model(M, cfg)
        except Exception as e:
            notes.append("small vision patch_size/num_position_embeddings rejected (%r); class defaults used" % (e,))
            print("qwen3_5_moe_vl: falling back to default vision patch/pos sizes:", repr(e))
            vision.pop("patch_size"); vision.pop("num_position_embeddings")
            cfg = C(text_config=dict(text), vision_config=dict(vision), tie_word_embeddings=False, eos_token_id=1)
            model = build_model(M, cfg)
        return "qwen3_5_moe", cfg, model, M, 320
    if variant == "qwen3_next_v2":
        from transformers.models.qwen3_next import Qwen3NextConfig as C, Qwen3NextForCausalLM as M
        cfg = C(vocab_size=300, hidden_size=32, num_hidden_layers=4,
                layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
                num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                linear_num_key_heads=1, linear_num_value_heads=3, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_conv_kernel_dim=2, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                shared_expert_intermediate_size=24, intermediate_size=40, mlp_only_layers=[2],
                decoder_sparse_step=1, norm_topk_prob=False, rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters=rope(1e7, 0.25), max_position_embeddings=2048, eos_token_id=1)
        return "qwen3_next", cfg, build_model(M, cfg), M, 300
    if variant == "qwen3_moe_v2":
        from transformers.models.qwen3_moe import Qwen3MoeConfig as C, Qwen3MoeForCausalLM as M
        cfg = C(vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, head_dim=8, num_experts=10, num_experts_per_tok=3,
                moe_intermediate_size=16, intermediate_size=40, mlp_only_layers=[1], decoder_sparse_step=1,
                norm_topk_prob=False, rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters=rope(1e4), max_position_embeddings=2048, eos_token_id=1)
        return "qwen3_moe", cfg, build_model(M, cfg), M, 300
    if variant == "mixtral_v2":
        from transformers.models.mixtral import MixtralConfig as C, MixtralForCausalLM as M
        cfg = C(vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, head_dim=8, intermediate_size=24, num_local_experts=6,
                num_experts_per_tok=3, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters=rope(1e6), max_position_embeddings=2048, eos_token_id=1)
        return "mixtral", cfg, build_model(M, cfg), M, 300
    raise SystemExit(variant)


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
        else:
            fan_in = shape[-1] if len(shape) >= 2 else 1
            scale = 1.0 / math.sqrt(fan_in)
            if name.endswith("gate.weight") and "proj" not in name:
                scale *= 4.0  # decisive routing: keep top-k away from ties
            p.copy_(scale * torch.randn(shape, generator=g))


def cases(vocab):
    return {
        "short": [3, 17, 250, 99, 4, 4, 212],
        "chunk": [(i * 37 + 11) % vocab for i in range(100)],
    }


def load_kwargs():
    # float32 holds every bf16 value exactly, and the buffers are computed in float32
    return dict(attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)


def load_saved(M, d):
    try:
        m = M.from_pretrained(d, **load_kwargs())
    except TypeError:
        kw = load_kwargs(); kw.pop("experts_implementation")
        m = M.from_pretrained(d, **kw)
    return m


def reference(model, CASES, meta):
    """Float64 reference outputs of `model` (already float64, eval) for each case."""
    import transformers
    meta.update({"transformers_version": transformers.__version__, "cases": {},
                 "note": "logits_<case>[t] is the next-token distribution after tokens[0..t]; hidden_<case>_<i> is HF output_hidden_states[i] (0 = embeddings); computed in float64 on the checkpoint reloaded from disk"})
    ref = {}
    with torch.no_grad():
        for cname, toks in CASES.items():
            ids = torch.tensor([toks], dtype=torch.long)
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            ref[f"tokens_{cname}"] = ids[0].to(torch.int32)
            ref[f"logits_{cname}"] = out.logits[0].to(torch.float32).contiguous()
            for i, h in enumerate(out.hidden_states):
                ref[f"hidden_{cname}_{i}"] = h[0].to(torch.float32).contiguous()
            # An explicit all-ones mask: without it generate() masks every prompt token equal
            # to pad_token_id (token 0 occurs in the chunk prompts of the small vocabularies).
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                 do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
            seq = gen.sequences
            margins = [float(t[0] - t[1]) for t in (s[0].topk(2).values for s in gen.scores)]
            ref[f"greedy_{cname}"] = seq[0, len(toks):].to(torch.int32).contiguous()
            meta["cases"][cname] = {"n_tokens": len(toks), "n_hidden": len(out.hidden_states),
                                    "greedy": seq[0, len(toks):].tolist(),
                                    "greedy_min_top2_margin": min(margins)}
    return ref


BASE_CLASSES = {"qwen3_5_moe": ("transformers.models.qwen3_5_moe", "Qwen3_5MoeForCausalLM"),
                "qwen3_next": ("transformers.models.qwen3_next", "Qwen3NextForCausalLM"),
                "qwen3_moe": ("transformers.models.qwen3_moe", "Qwen3MoeForCausalLM"),
                "mixtral": ("transformers.models.mixtral", "MixtralForCausalLM")}
BASE_CASES = {"single": [7], "short": [3, 17, 250, 999, 4, 4, 512],
              "chunk": [(i * 37 + 11) % 1024 for i in range(100)]}


def rebase(src_root, arch):
    """Recomputes the reference of a shared fixture (../shared/fixtures/<arch>, copied into
    tests/data) on its checkpoint as saved: shared/tools/make_fixtures.py computed it on the
    in-memory model after .to(bfloat16), whose rotary inv_freq buffers were rounded to bf16."""
    import importlib
    mod, cls = BASE_CLASSES[arch]
    M = getattr(importlib.import_module(mod), cls)
    src = os.path.join(src_root, arch)
    model = load_saved(M, src).to(torch.float64).eval()
    d = os.path.join(OUT, arch)
    os.makedirs(d, exist_ok=True)
    meta = {"arch": arch, "hf_class": cls, "source": "shared/fixtures/" + arch + " checkpoint, reference recomputed"}
    ref = reference(model, BASE_CASES, meta)
    old = json.load(open(os.path.join(src, "reference.json")))
    for c in BASE_CASES:
        same = old["cases"][c]["greedy"] == meta["cases"][c]["greedy"]
        print(f"{arch} {c}: greedy same as shared reference: {same}; min top2 margin {meta['cases'][c]['greedy_min_top2_margin']:.3f}")
    save_file(ref, os.path.join(d, "reference.safetensors"))
    json.dump(meta, open(os.path.join(d, "reference.json"), "w"), indent=1)
    return True


def run(variant):
    d = os.path.join(OUT, variant)
    os.makedirs(d, exist_ok=True)
    notes = []
    arch, cfg, model, M, vocab = make(variant, notes)
    randomize(model)
    model = model.to(torch.bfloat16)
    model.save_pretrained(d, safe_serialization=True)
    saved_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    CASES = cases(vocab)
    chunk_ids = torch.tensor([CASES["chunk"]], dtype=torch.long)

    # Module.to(bfloat16) also rounds the non-persistent buffers (rotary inv_freq)
    # to bf16; upcasting that in-memory model would bake bf16 RoPE frequencies into
    # the reference.  So: measure that effect, then run the reference on the
    # checkpoint reloaded from disk (float32 buffers, as any loader computes them).
    fresh = dict(build_model(M, cfg).named_buffers())
    rounded = [k for k, v in model.named_buffers()
               if k in fresh and not torch.equal(v.to(torch.float64), fresh[k].to(torch.float64))]
    with torch.no_grad():
        model = model.to(torch.float64).eval()
        old_logits = model(input_ids=chunk_ids, use_cache=False).logits[0].to(torch.float32)
    del model

    model = load_saved(M, d)
    bad = []
    re_sd = model.state_dict()
    for k, v in saved_sd.items():
        if k not in re_sd:
            bad.append(f"missing {k}")
        elif re_sd[k].shape != v.shape or not torch.equal(re_sd[k], v.to(re_sd[k].dtype)):
            bad.append(f"param differs {k}")
    for k in re_sd:
        if k not in saved_sd:
            bad.append(f"extra {k}")
    model = model.to(torch.float64).eval()
    for k, v in model.named_buffers():
        if k in fresh and not torch.equal(v, fresh[k].to(torch.float64)):
            bad.append(f"buffer differs {k} ({fresh[k].dtype})")

    meta = {"arch": arch, "variant": variant, "hf_class": M.__name__}
    if notes:
        meta["adaptations"] = notes
    ref = reference(model, CASES, meta)
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

    quirk = (old_logits - ref["logits_chunk"]).abs().max().item()
    status = "ok" if not bad else "MISMATCH"
    print(f"{variant}: round-trip {status}: {len(bad)} problems; bf16-rounded buffers in the in-memory model: {rounded}; "
          f"max |dlogits_chunk| (in-memory upcast vs reloaded) = {quirk:.3e}")
    for b in bad[:20]:
        print("   ", b)
    nbytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"{variant} ({arch}, {M.__name__}): {len(names)} tensors, folder {nbytes/1024:.0f} KiB, files {sorted(os.listdir(d))}")
    print("  tensors.txt head:")
    for n in names[:12]:
        print("   ", n)
    prefixes = sorted({".".join(n.split()[0].split(".")[:2]) for n in names})
    print("  name prefixes:", prefixes)
    for cname, c in meta["cases"].items():
        print(f"  greedy({cname}) =", c["greedy"][:12], "min top2 margin %.3f" % c["greedy_min_top2_margin"])
    return status == "ok"


ALL = ["qwen3_5_moe_v2", "qwen3_5_moe_vl", "qwen3_next_v2", "qwen3_moe_v2", "mixtral_v2"]
if __name__ == "__main__":
    import transformers
    print("torch", torch.__version__, "transformers", transformers.__version__)
    results = {}
    if sys.argv[2:3] == ["--rebase"]:
        # make_variant_fixtures.py OUT --rebase SRC_ROOT [arch ...]
        for a in (sys.argv[4:] or list(BASE_CLASSES)):
            results[a] = "ok" if rebase(sys.argv[3], a) else "FAILED"
        print("SUMMARY", json.dumps(results))
        sys.exit(0)
    for v in (sys.argv[2:] or ALL):
        try:
            results[v] = "ok" if run(v) else "round-trip mismatch"
        except Exception:
            traceback.print_exc()
            results[v] = "FAILED"
    print("SUMMARY", json.dumps(results))
    sys.exit(0 if all(r == "ok" for r in results.values()) else 1)
