"""gpt-oss (GptOssForCausalLM) fixtures for the oracle test (issue 17), made with transformers on
the GPU machine (it runs on the CPU there; torch + transformers + safetensors are all it needs).

    python3 tools/refs/make_fixtures_gpt_oss.py OUTDIR [gpt_oss] [gpt_oss_v2]

Self-contained sibling of make_fixtures.py (same cases, same reference layout, same float64
reference on the model reloaded from its saved checkpoint). For each fixture it writes
OUTDIR/<name>/:
  config.json, generation_config.json   the checkpoint's config, with gpt-oss's
                                        quantization_config {quant_method: mxfp4, ...}
  model.safetensors                     MXFP4 checkpoint layout, as openai/gpt-oss-* ship it:
                                        mlp.experts.{gate_up,down}_proj_blocks (u8 [E, out, in/32,
                                        16], low nibble = even column) and _scales (u8 e8m0
                                        [E, out, in/32]); biases and every other tensor bf16
  bf16/config.json, bf16/model.safetensors   the same weights as the plain bf16 checkpoint
                                        transformers saves (experts gate_up_proj [E, H, 2I],
                                        down_proj [E, I, H]), for the bf16/q8/q4 import paths
  reference.safetensors, reference.json, tensors.txt   as make_fixtures.py writes them
The random expert weights are first rounded to MXFP4 (e2m1 value x 2^e per 32 inputs), so the bf16
checkpoint, the MXFP4 checkpoint and the float64 reference all hold the same values (e2m1 x 2^e is
exact in bf16). The reference model is reloaded from the MXFP4 checkpoint through transformers'
own MXFP4 dequantiser (Mxfp4Config(dequantize=True)) when this transformers can, and checked
equal, parameter by parameter, to the bf16 checkpoint reloaded; reference.json records which
reload the references come from and the result of that check.

  gpt_oss     4 layers, layer_types sliding/full alternating (the HF default), sliding_window 16
              (the 100-token case is 6x the window), hidden 64, 4 heads / 2 kv heads, head_dim 24
              (q width 96 != hidden), 8 experts top-2, intermediate 96, attention biases, sinks,
              YaRN as gpt-oss ships it (truncate False, factor 4 from 32 positions, theta 150000;
              the chunk case runs past the original context), untied lm_head.
  gpt_oss_v2  3 layers [full, sliding, sliding], sliding_window 7, hidden 96, 6 heads / 1 kv head,
              head_dim 16, 6 experts top-3, intermediate 64, no attention bias, default rope
              (theta 10000), tied embeddings.
Expert gate_up weights are scaled so that gate and up often pass +-7 (swiglu_limit): the clamp is
exercised. The sinks are N(0, 1.5^2) so they take a visible share of the softmax.
"""
import json, math, os, shutil, sys
import torch
from safetensors.torch import save_file, load_file

OUT = sys.argv[1]
ARCHS = sys.argv[2:] or ["gpt_oss", "gpt_oss_v2"]

CASES = {
    "single": [7],
    "short": [3, 17, 250, 999, 4, 4, 512],
    "chunk": [(i * 37 + 11) % 1024 for i in range(100)],
}

# e2m1 code -> value (bit 3 sign, bits 0-2 magnitude), as transformers' FP4_VALUES
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def gpt_oss_config(name):
    from transformers import GptOssConfig as C
    if name == "gpt_oss":
        return C(vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24, intermediate_size=96, num_local_experts=8,
                 num_experts_per_tok=2, sliding_window=16, attention_bias=True, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=128,
                 layer_types=["sliding_attention", "full_attention"] * 2,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                  "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                  "original_max_position_embeddings": 32},
                 eos_token_id=1, bos_token_id=0, pad_token_id=2)
    if name == "gpt_oss_v2":
        return C(vocab_size=1024, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                 num_key_value_heads=1, head_dim=16, intermediate_size=64, num_local_experts=6,
                 num_experts_per_tok=3, sliding_window=7, attention_bias=False, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=512,
                 layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 eos_token_id=1, bos_token_id=0, pad_token_id=2)
    raise SystemExit(f"unknown fixture {name}")


def make_model(cfg):
    from transformers import GptOssForCausalLM as M
    for kw in (dict(attn_implementation="eager", experts_implementation="eager"), dict(attn_implementation="eager")):
        try:
            return M._from_config(cfg, dtype=torch.float32, **kw)
        except TypeError:
            continue
    raise SystemExit("cannot build GptOssForCausalLM")


def mxfp4_round(w, g):
    """w [..., K] (K % 32 == 0, the input dimension last): returns (codes u8 [..., K], exps i32
    [..., K/32]) with w' = E2M1[code] * 2^exp the MXFP4 value nearest w/2^exp, exp the smallest
    with max|w| / 2^exp <= 6 (so every block uses its range)."""
    *lead, K = w.shape
    blk = w.double().reshape(*lead, K // 32, 32)
    amax = blk.abs().amax(-1)
    e = torch.ceil(torch.log2(torch.clamp(amax, min=1e-30) / 6.0)).to(torch.int32)
    e = torch.where(amax > 0, e, torch.zeros_like(e)).clamp(-127, 127)
    x = blk / torch.pow(2.0, e.double())[..., None]
    mags = torch.tensor(E2M1[:8], dtype=torch.float64)
    idx = (x.abs()[..., None] - mags).abs().argmin(-1)  # ties to the smaller magnitude
    codes = (idx + 8 * (x < 0).long()).to(torch.uint8)
    return codes.reshape(*lead, K), e


def mxfp4_value(codes, e):
    lut = torch.tensor(E2M1, dtype=torch.float64)
    *lead, K = codes.shape
    v = lut[codes.long()].reshape(*lead, K // 32, 32) * torch.pow(2.0, e.double())[..., None]
    return v.reshape(*lead, K)


def mxfp4_pack(codes, e):
    *lead, K = codes.shape
    c = codes.reshape(*lead, K // 32, 32)
    blocks = (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8).contiguous()  # [..., K/32, 16]
    scales = (e + 127).to(torch.uint8).contiguous()  # e8m0
    return blocks, scales


@torch.no_grad()
def randomize(model, cfg):
    """Every parameter, seeded. Returns {checkpoint base name: (codes, exps)} of the expert
    matrices in checkpoint orientation ([E, out, in]), after setting the parameters to their
    MXFP4 values."""
    g = torch.Generator().manual_seed(4242)
    mx = {}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(shape, generator=g))
        elif name.endswith("sinks"):
            p.copy_(1.5 * torch.randn(shape, generator=g))
        elif name.endswith("mlp.router.weight"):
            p.copy_(4.0 / math.sqrt(shape[-1]) * torch.randn(shape, generator=g))  # decisive routing
        elif name.endswith("mlp.router.bias"):
            p.copy_(0.5 * torch.randn(shape, generator=g))
        elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            # the checkpoint stores [E, out, in], blocks along in; the parameter is [E, in, out]
            # (transformers' GptOssExperts) or, should a version change it, [E, out, in]
            gu = name.endswith("gate_up_proj")
            K = cfg.hidden_size if gu else cfg.intermediate_size
            N = 2 * cfg.intermediate_size if gu else cfg.hidden_size
            E = shape[0]
            assert K != N and shape in ((E, K, N), (E, N, K)), (name, shape)
            transposed = shape == (E, K, N)
            gain = 4.0 if name.endswith("gate_up_proj") else 1.0  # gate/up often beyond +-7
            w = gain / math.sqrt(K) * torch.randn((E, N, K), generator=g, dtype=torch.float64)
            # spread the block exponents: each (row, block) scaled by 2^{-2..1}
            mult = torch.pow(2.0, torch.randint(-2, 2, (E, N, K // 32), generator=g).double())
            w = (w.reshape(E, N, K // 32, 32) * mult[..., None]).reshape(E, N, K)
            codes, e = mxfp4_round(w, g)
            v = mxfp4_value(codes, e)
            p.copy_((v.transpose(1, 2) if transposed else v).to(p.dtype))
            mx[name] = (codes, e, transposed)
        elif name.endswith("experts.gate_up_proj_bias") or name.endswith("experts.down_proj_bias"):
            p.copy_(0.5 * torch.randn(shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.3 * torch.randn(shape, generator=g))
        else:
            fan_in = shape[-1] if len(shape) >= 2 else 1
            p.copy_(1.0 / math.sqrt(fan_in) * torch.randn(shape, generator=g))
    missing = [n for n, _ in model.named_parameters() if "experts.gate_up_proj" in n and not n.endswith("bias") and n not in mx]
    assert not missing, missing
    return mx


def save_mxfp4_checkpoint(model, bf16_dir, d, mx):
    """The MXFP4 checkpoint: the bf16 checkpoint's tensors with each expert matrix replaced by its
    _blocks/_scales, config.json with gpt-oss's quantization_config."""
    files = sorted(f for f in os.listdir(bf16_dir) if f.startswith("model") and f.endswith(".safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(bf16_dir, f)))
    names = {n for n in mx}
    if not names <= set(sd):  # a transformers that renames on save: start from the parameters
        print("note: saved names differ from parameter names; writing the MXFP4 checkpoint from state_dict()")
        sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
    for n, (codes, e, transposed) in mx.items():
        # the bf16 tensor must hold exactly the MXFP4 values
        v = mxfp4_value(codes, e)
        assert torch.equal(sd[n].double(), v.transpose(1, 2) if transposed else v), n
        del sd[n]
        sd[n + "_blocks"], sd[n + "_scales"] = mxfp4_pack(codes, e)
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(bf16_dir, "config.json")))
    cfg["quantization_config"] = {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4"}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2)
    if os.path.exists(os.path.join(bf16_dir, "generation_config.json")):
        shutil.copy(os.path.join(bf16_dir, "generation_config.json"), d)


def load_f64(path, mxfp4):
    from transformers import GptOssForCausalLM as M
    extra = {}
    if mxfp4:
        from transformers import Mxfp4Config
        extra["quantization_config"] = Mxfp4Config(dequantize=True)
    last = None
    for kw in (dict(attn_implementation="eager", experts_implementation="eager"), dict(attn_implementation="eager")):
        try:
            return M.from_pretrained(path, dtype=torch.float64, **kw, **extra).eval()
        except TypeError as ex:
            last = ex
    raise last


def same_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if set(pa) != set(pb):
        return f"parameter names differ: {sorted(set(pa) ^ set(pb))[:6]}"
    for k in pa:
        if pa[k].shape != pb[k].shape:
            return f"{k}: shape {tuple(pa[k].shape)} vs {tuple(pb[k].shape)}"
        if not torch.equal(pa[k].detach().double().cpu(), pb[k].detach().double().cpu()):
            return f"{k}: values differ (max {float((pa[k].double() - pb[k].double()).abs().max())})"
    return "equal"


def clamp_fraction(model, ids):
    ex = model.model.layers[0].mlp.experts
    seen = []
    hook = ex.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    H = model.config.hidden_size
    w = ex.gate_up_proj.double()
    if w.shape[1] != H:
        w = w.transpose(1, 2)
    x = seen[0].reshape(-1, H).double()
    gu = torch.einsum("th,ehf->etf", x, w) + ex.gate_up_proj_bias.double()[:, None, :]
    return float((gu.abs() > 7.0).double().mean())


def run(name):
    import transformers
    d = os.path.join(OUT, name)
    bf16_dir = os.path.join(d, "bf16")
    os.makedirs(bf16_dir, exist_ok=True)
    torch.manual_seed(1234)
    cfg = gpt_oss_config(name)
    model = make_model(cfg)
    mx = randomize(model, cfg)
    model = model.to(torch.bfloat16)
    model.save_pretrained(bf16_dir, safe_serialization=True)
    save_mxfp4_checkpoint(model, bf16_dir, d, mx)
    del model

    ref_bf16 = load_f64(bf16_dir, False)
    meta = {"arch": name, "transformers_version": transformers.__version__, "cases": {},
            "note": "logits_<case>[t] is the next-token distribution after tokens[0..t]; hidden_<case>_<i> is HF output_hidden_states[i] (0 = embeddings)",
            "sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types)}
    try:
        ref_mx = load_f64(d, True)
        meta["mxfp4_reload_vs_bf16_reload"] = same_params(ref_mx, ref_bf16)
    except Exception as ex:  # this transformers cannot dequantise on load here: say so
        ref_mx = None
        meta["mxfp4_reload_vs_bf16_reload"] = f"mxfp4 reload failed: {type(ex).__name__}: {ex}"[:400]
    print(name, "MXFP4 reload vs bf16 reload:", meta["mxfp4_reload_vs_bf16_reload"])
    # The references always come from the bf16 reload in float64 (the MXFP4 reload keeps its
    # dequantised experts in bf16 after a float64 cast); its values are the MXFP4 reload's
    # whenever the line above says "equal".
    del ref_mx
    model = ref_bf16
    meta["reference_from"] = ("bf16 checkpoint reloaded in float64; the MXFP4 checkpoint reloaded through "
                              "transformers' dequantiser holds the same values iff mxfp4_reload_vs_bf16_reload is 'equal'")
    try:
        ex0 = model.model.layers[0].mlp.experts
        lim = getattr(ex0, "limit", getattr(cfg, "swiglu_limit", None))
        alp = getattr(ex0, "alpha", getattr(cfg, "swiglu_alpha", None))
        meta["experts_limit_alpha"] = [None if lim is None else float(lim), None if alp is None else float(alp)]
    except Exception as ex:
        meta["experts_limit_alpha"] = f"not read: {type(ex).__name__}: {ex}"[:200]

    ref = {}
    with torch.no_grad():
        for cname, toks in CASES.items():
            ids = torch.tensor([toks], dtype=torch.long)
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            ref[f"tokens_{cname}"] = ids[0].to(torch.int32)
            ref[f"logits_{cname}"] = out.logits[0].to(torch.float32).contiguous()
            for i, h in enumerate(out.hidden_states):
                ref[f"hidden_{cname}_{i}"] = h[0].to(torch.float32).contiguous()
            res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            gen = res.sequences
            ref[f"greedy_{cname}"] = gen[0, len(toks):].to(torch.int32).contiguous()
            case = {"n_tokens": len(toks), "n_hidden": len(out.hidden_states), "greedy": gen[0, len(toks):].tolist()}
            meta["cases"][cname] = case
            # metadata only from here on: nothing below may stop the run
            try:
                case["greedy_min_top2_margin"] = min(float(t[0] - t[1]) for t in (sc[0].topk(2).values for sc in res.scores))
            except Exception as ex:
                case["greedy_min_top2_margin"] = f"not computed: {type(ex).__name__}: {ex}"[:200]
            try:
                # the greedy continuation recomputed without a cache (the whole sequence at once):
                # checks HF's sliding-window cache against its own mask
                full = model(input_ids=gen, use_cache=False).logits[0, len(toks) - 1:-1].argmax(-1)
                case["greedy_equals_uncached_argmax"] = bool(torch.equal(full, gen[0, len(toks):]))
            except Exception as ex:
                case["greedy_equals_uncached_argmax"] = f"not computed: {type(ex).__name__}: {ex}"[:200]
            print(f"{name} {cname}: greedy min top-2 margin {case['greedy_min_top2_margin']}, "
                  f"uncached argmax equal: {case['greedy_equals_uncached_argmax']}")
            if cname == "chunk":  # how often the clamp bites (layer 0's expert inputs)
                try:
                    meta["layer0_gate_up_beyond_limit_fraction"] = clamp_fraction(model, ids)
                except Exception as ex:
                    meta["layer0_gate_up_beyond_limit_fraction"] = f"not computed: {type(ex).__name__}: {ex}"[:200]
    save_file(ref, os.path.join(d, "reference.safetensors"))
    json.dump(meta, open(os.path.join(d, "reference.json"), "w"), indent=1)
    try:
        write_tensor_list(d, bf16_dir)
    except Exception as ex:
        print(name, "tensors.txt not written:", type(ex).__name__, ex)
    print(name, "ok; reference from the bf16 reload; greedy(single) =", meta["cases"]["single"]["greedy"][:8])


def write_tensor_list(d, bf16_dir):
    from safetensors import safe_open
    names = []
    for sub in (d, bf16_dir):
        for f in sorted(os.listdir(sub)):
            if f.startswith("model") and f.endswith(".safetensors"):
                with safe_open(os.path.join(sub, f), "pt") as sf:
                    for k in sf.keys():
                        names.append(f"{os.path.relpath(os.path.join(sub, f), d)}: {k} {list(sf.get_slice(k).get_shape())} {sf.get_slice(k).get_dtype()}")
    open(os.path.join(d, "tensors.txt"), "w").write("\n".join(names) + "\n")


failed = []
for a in ARCHS:
    try:
        run(a)
    except Exception:  # one fixture's failure must not cost the other (nor the render after it)
        import traceback
        traceback.print_exc()
        failed.append(a)
print("FAILED fixtures:", failed if failed else "none")
sys.exit(1 if failed else 0)
