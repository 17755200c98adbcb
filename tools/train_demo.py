#!/usr/bin/env python3
"""Trains moeflux's demo model: a small Qwen3.5-MoE (HF `qwen3_5_moe_text`,
Qwen3_5MoeForCausalLM) that writes English, from the public-domain corpus that
scripts/fetch_corpus.sh builds (King James Bible + Jane Austen's novels).

One run does everything, on one CUDA GPU (torch + transformers 5.x + tokenizers):
  1. trains a 4096-token byte-level BPE tokenizer on train.txt (Qwen2/3-style
     pipeline: NFC, Split(Qwen regex), ByteLevel; one special token <|endoftext|>);
  2. tokenises the corpus (documents joined with <|endoftext|>);
  3. builds the model, prints its parameter count, trains it (bf16 autocast, AdamW,
     warmup + cosine, router load-balancing loss on);
  4. saves a bf16 safetensors checkpoint + tokenizer files + generation_config.json;
  5. reloads the saved checkpoint from disk in float32 and measures perplexity on
     valid.txt, llama.cpp-style (see perplexity()), written to hf_reference.json;
  6. writes greedy and sampled continuations of a few prompts (generations.json).

    python3 tools/train_demo.py --corpus build/demo/corpus --out build/demo [--steps N]

Outputs under --out: hf/ (the checkpoint), hf_reference.json, train_log.json,
generations.json. The defaults are the shipped model's settings (500 steps of 64 x 512 tokens,
about 85 s on one H100); longer runs overfit the 2 M-token corpus (see
docs/2026-11-26-demo-model.md). --bench N times the expert implementations first.
"""
import argparse, hashlib, json, math, os, sys, time, types

import torch
import torch.nn.functional as F

EOT = "<|endoftext|>"
# Qwen2/Qwen3's pre-tokeniser pattern.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PROMPTS = ["And it came to pass", "It was a fine morning, and Elizabeth",
           "Mrs. Jennings was"]


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(docs, vocab_size, out_dir):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    assert tok.token_to_id(EOT) == 0
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    # No chat template: this is a plain text model.
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {"0": {"content": EOT, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}},
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 4096,
        "split_special_tokens": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return tok


# ----------------------------------------------------------------------------- model

def make_config(a, vocab_size):
    from transformers.models.qwen3_5_moe import Qwen3_5MoeTextConfig
    n = a.layers
    layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
    return Qwen3_5MoeTextConfig(
        vocab_size=vocab_size, hidden_size=a.hidden, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4,
        moe_intermediate_size=a.moe_inter, shared_expert_intermediate_size=a.shared_inter,
        num_experts=a.experts, num_experts_per_tok=a.topk,
        layer_types=layer_types, rms_norm_eps=1e-6, tie_word_embeddings=bool(a.tie),
        rope_parameters={"rope_theta": a.rope_theta, "partial_rotary_factor": 0.25, "rope_type": "default"},
        max_position_embeddings=4096, initializer_range=0.02,
        output_router_logits=False, router_aux_loss_coef=a.aux_coef,
        bos_token_id=0, eos_token_id=0, pad_token_id=None)


def build_model(cls, cfg, experts_impl, **kw):
    try:
        return cls._from_config(cfg, experts_implementation=experts_impl, **kw)
    except TypeError:
        cfg._experts_implementation = experts_impl
        return cls._from_config(cfg, **kw)


def grouped_bf16_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Same function as Qwen3_5MoeExperts.forward (eager), computed with torch._grouped_mm in
    bf16 (one kernel per projection for all experts). Used for training only."""
    n_tok, k = top_k_index.shape
    E = self.gate_up_proj.shape[0]
    flat_e = top_k_index.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    tok_of = (torch.arange(n_tok * k, device=hidden_states.device) // k)[order]
    counts = torch.bincount(flat_e, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = hidden_states[tok_of].to(torch.bfloat16)
    gu = torch._grouped_mm(x, self.gate_up_proj.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    h = self.act_fn(gate) * up
    y = torch._grouped_mm(h, self.down_proj.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    w = top_k_weights.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros(n_tok, hidden_states.shape[1], device=hidden_states.device, dtype=torch.float32)
    out.index_add_(0, tok_of, (y.float() * w.float()))
    return out.to(hidden_states.dtype)


def patch_experts(model):
    n = 0
    for m in model.modules():
        if type(m).__name__.endswith("MoeExperts"):
            m.forward = types.MethodType(grouped_bf16_experts_forward, m)
            n += 1
    return n


def count_params(model, cfg):
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.model.embed_tokens.weight.numel()
    per_expert = experts // (cfg.num_experts * cfg.num_hidden_layers)
    active = total - experts + per_expert * cfg.num_experts_per_tok * cfg.num_hidden_layers
    return {"total": total, "routed_experts": experts, "embedding": embed,
            "lm_head_separate": 0 if cfg.tie_word_embeddings else model.lm_head.weight.numel(),
            "non_expert": total - experts, "active_per_token": active,
            "bf16_bytes": 2 * total}


# ----------------------------------------------------------------------------- data

def read_docs(path):
    text = open(path, encoding="utf-8").read()
    return text, [d for d in text.split("\n\n\n") if d.strip()]


def encode_stream(tok, docs):
    ids = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.append(0)  # <|endoftext|> before every document
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int32)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def perplexity(model, ids, ctx, batch, device):
    """llama.cpp-style perplexity over a token sequence: non-overlapping windows of `ctx`
    tokens (the remainder dropped), each evaluated from a fresh state (no cache, no BOS
    added); the score is the NLL of tokens ctx/2 .. ctx-1 of each window, each predicted from
    the tokens before it in the window. Also gives the count that llama.cpp's own
    perplexity tool scores (tokens ctx/2+1 .. ctx-1) for comparison."""
    n_win = len(ids) // ctx
    w = ids[: n_win * ctx].view(n_win, ctx).long()
    first = ctx // 2
    sums, sums_lcpp = [], []
    nll_all, nll_lcpp = [], []
    for s in range(0, n_win, batch):
        x = w[s:s + batch].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, first - 1:ctx - 1], dim=-1)  # predicts tokens first..ctx-1
        nll = -logp.gather(-1, x[:, first:ctx, None]).squeeze(-1).double().cpu()  # [b, ctx-first]
        nll_all.append(nll.reshape(-1))
        nll_lcpp.append(nll[:, 1:].reshape(-1))
        sums += nll.sum(1).tolist()
        sums_lcpp += nll[:, 1:].sum(1).tolist()

    def stats(v):
        v = torch.cat(v)
        cnt = v.numel()
        mean = v.mean().item()
        # llama.cpp: nll2 = mean(x^2) - mean(x)^2; err = sqrt(nll2 / (count-1)); ppl ± ppl*err
        var = (v * v).mean().item() - mean * mean
        se = math.sqrt(var / (cnt - 1)) if var > 0 else 0.0
        ppl = math.exp(mean)
        return {"tokens_scored": cnt, "mean_nll": mean, "ppl": ppl, "ppl_err": ppl * se,
                "nll_stderr": se}

    r = {"ctx": ctx, "windows": n_win, "tokens_used": n_win * ctx,
         "scored_positions": [first, ctx - 1], "scored_per_window": ctx - first}
    r.update(stats(nll_all))
    r["window_nll_sums"] = [round(v, 6) for v in sums]
    r["llama_cpp_positions"] = {"scored_positions": [first + 1, ctx - 1], **stats(nll_lcpp)}
    return r


@torch.no_grad()
def valid_loss(model, windows, batch, amp=True):
    model.eval()
    tot, cnt = 0.0, 0
    for s in range(0, windows.shape[0], batch):
        x = windows[s:s + batch]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        tot += loss.item()
        cnt += x[:, 1:].numel()
    model.train()
    return tot / cnt


@torch.no_grad()
def expert_load(model, ids, ctx, device, n_windows=32):
    """Fraction of routed (token, slot) assignments per expert, per layer, on valid text."""
    n = min(n_windows, len(ids) // ctx)
    x = ids[: n * ctx].view(n, ctx).long().to(device)
    out = model(input_ids=x, use_cache=False, output_router_logits=True)
    k = model.config.num_experts_per_tok
    E = model.config.num_experts
    loads = []
    for rl in out.router_logits:
        sel = torch.topk(rl.float(), k, dim=-1).indices.reshape(-1)
        loads.append((torch.bincount(sel, minlength=E).float() / sel.numel()).tolist())
    return loads


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="build/demo/corpus")
    ap.add_argument("--out", default="build/demo")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=64)
    ap.add_argument("--shared-inter", type=int, default=128)
    ap.add_argument("--tie", type=int, default=1)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--valid-windows", type=int, default=64)
    ap.add_argument("--experts-impl", default="grouped_bf16", choices=["grouped_bf16", "eager", "grouped_mm"])
    ap.add_argument("--time-limit", type=float, default=470.0, help="stop training after this many seconds")
    ap.add_argument("--bench", type=int, default=0, help="time N steps of each experts implementation first")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--gen-tokens", type=int, default=80)
    ap.add_argument("--no-eval", action="store_true",
                    help="stop after saving the checkpoint and train_log.json: no float32 reference "
                         "perplexity, expert load or generations (scripts/train-moe128.sh, where the "
                         "GPU time goes to training)")
    a = ap.parse_args()

    import transformers
    from transformers import GenerationConfig
    from transformers.models.qwen3_5_moe import Qwen3_5MoeForCausalLM
    import tokenizers
    dev = torch.device("cuda")
    log(f"torch {torch.__version__}  transformers {transformers.__version__}  tokenizers {tokenizers.__version__}"
        f"  device {torch.cuda.get_device_name(0)}")
    torch.manual_seed(a.seed)
    hf_dir = os.path.join(a.out, "hf")
    os.makedirs(hf_dir, exist_ok=True)
    run_info = {"args": vars(a), "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                              "tokenizers": tokenizers.__version__},
                "device": torch.cuda.get_device_name(0)}

    # 1. tokenizer
    t0 = time.time()
    train_text, train_docs = read_docs(os.path.join(a.corpus, "train.txt"))
    valid_text, valid_docs = read_docs(os.path.join(a.corpus, "valid.txt"))
    tok = train_tokenizer(train_docs, a.vocab, hf_dir)
    log(f"tokenizer: {tok.get_vocab_size()} tokens, trained in {time.time() - t0:.1f}s")

    # 2. data
    t0 = time.time()
    train_ids = encode_stream(tok, train_docs)
    valid_ids = torch.tensor(tok.encode(valid_text, add_special_tokens=False).ids, dtype=torch.int32)
    log(f"train: {len(train_docs)} docs, {len(train_text)} chars, {train_ids.numel()} tokens "
        f"({len(train_text.encode()) / train_ids.numel():.2f} bytes/token); valid: {len(valid_docs)} docs, "
        f"{valid_ids.numel()} tokens (whole file, no special tokens); {time.time() - t0:.1f}s")
    run_info["data"] = {"train_docs": len(train_docs), "train_tokens": train_ids.numel(),
                        "valid_docs": len(valid_docs), "valid_tokens": valid_ids.numel()}
    train_gpu = train_ids.to(dev).long()
    L = a.seq + 1
    nvw = min(a.valid_windows, valid_ids.numel() // L)
    vwin = valid_ids[: nvw * L].view(nvw, L).long().to(dev)

    # 3. model
    cfg = make_config(a, tok.get_vocab_size())
    model = build_model(Qwen3_5MoeForCausalLM, cfg, "eager", dtype=torch.float32).to(dev)
    pc = count_params(model, cfg)
    log("parameters: " + ", ".join(f"{k} {v:,}" for k, v in pc.items()))
    log(f"bf16 checkpoint ~ {pc['bf16_bytes'] / 1e6:.2f} MB")
    run_info["params"] = pc
    if a.experts_impl == "grouped_bf16":
        log(f"experts: grouped_bf16 (torch._grouped_mm) on {patch_experts(model)} layers")
    elif a.experts_impl == "grouped_mm":
        model.config._experts_implementation = "grouped_mm"

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "norm" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        t = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    ar = torch.arange(L, device=dev)

    def batch():
        off = torch.randint(0, train_gpu.numel() - L, (a.batch,), generator=gen).to(dev)
        return train_gpu[off[:, None] + ar]

    E, K = cfg.num_experts, cfg.num_experts_per_tok

    def balance_loss(router_logits):
        """Switch-style load-balancing loss, per layer, averaged over layers: E * sum_e f_e * P_e with
        f_e = top-k assignments to e per token, P_e = mean router probability of e (= K when balanced).
        transformers' load_balancing_loss_func sums counts and probabilities over the layers before
        the product, which balances expert e of all layers together and leaves a layer's experts
        free to die; this form balances each layer. Also returns the smallest per-layer slot share."""
        tot, min_share = 0.0, 1.0
        for lg in router_logits:
            p = torch.softmax(lg.float(), dim=-1)
            sel = torch.topk(p, K, dim=-1).indices
            f = torch.bincount(sel.reshape(-1), minlength=E).float() / p.shape[0]
            tot = tot + E * (f * p.mean(0)).sum()
            min_share = torch.minimum(torch.as_tensor(min_share, device=f.device), f.min() / K)
        return tot / len(router_logits), min_share

    def step_fn(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x[:, :-1], use_cache=False, output_router_logits=True)
        ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
        aux, min_share = balance_loss(out.router_logits)
        loss = ce + a.aux_coef * aux
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        return ce.detach(), aux.detach(), gn, min_share.detach()

    if a.bench:  # speed of the expert implementations (no optimizer step; grads discarded)
        impls = ["grouped_bf16", "eager"]
        for impl in impls:
            for m in model.modules():
                if type(m).__name__.endswith("MoeExperts"):
                    if impl == "grouped_bf16":
                        m.forward = types.MethodType(grouped_bf16_experts_forward, m)
                    elif "forward" in m.__dict__:
                        del m.forward
            try:
                x = batch()
                step_fn(x); torch.cuda.synchronize()
                t = time.time()
                for _ in range(a.bench):
                    step_fn(batch())
                torch.cuda.synchronize()
                dt = (time.time() - t) / a.bench
                log(f"bench {impl}: {dt * 1000:.1f} ms/step, {a.batch * a.seq / dt:,.0f} tok/s, "
                    f"peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            except Exception as e:  # noqa: BLE001
                log(f"bench {impl}: FAILED {type(e).__name__}: {e}")
            opt.zero_grad(set_to_none=True)
        # restore the chosen implementation
        for m in model.modules():
            if type(m).__name__.endswith("MoeExperts") and "forward" in m.__dict__:
                del m.forward
        if a.experts_impl == "grouped_bf16":
            patch_experts(model)
        gen.manual_seed(a.seed)
        torch.manual_seed(a.seed)

    # 4. train
    v0 = valid_loss(model, vwin, 16)
    log(f"step 0: valid CE {v0:.4f}")
    hist = [{"step": 0, "valid_ce": v0}]
    model.train()
    t_start = time.time()
    t_last, ce_acc, aux_acc, n_acc = t_start, 0.0, 0.0, 0
    step = 0
    stopped_early = False
    log(f"training {a.steps} steps x {a.batch} x {a.seq} tokens = {a.steps * a.batch * a.seq / 1e6:.1f}M tokens "
        f"({a.steps * a.batch * a.seq / train_ids.numel():.1f} epochs)")
    log(f"{'step':>6} {'lr':>9} {'train_ce':>9} {'aux':>7} {'valid_ce':>9} {'gnorm':>7} {'minshare':>8} {'tok/s':>10} {'elapsed':>8}")
    while step < a.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ce, aux, gn, min_share = step_fn(batch())
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ce_acc += ce
        aux_acc += aux
        n_acc += 1
        elapsed = time.time() - t_start
        last = step == a.steps or elapsed > a.time_limit
        if step % a.log_every == 0 or last:
            tr = (ce_acc / n_acc).item()
            ax = (aux_acc / n_acc).item()
            torch.cuda.synchronize()
            now = time.time()
            tps = n_acc * a.batch * a.seq / (now - t_last)
            vl = valid_loss(model, vwin, 16)
            rec = {"step": step, "lr": lr_at(step - 1), "train_ce": tr, "aux": ax, "valid_ce": vl,
                   "grad_norm": gn.item(), "min_expert_share": min_share.item(), "tok_per_s": tps,
                   "elapsed_s": now - t_start}
            hist.append(rec)
            log(f"{step:>6} {rec['lr']:>9.2e} {tr:>9.4f} {ax:>7.3f} {vl:>9.4f} {rec['grad_norm']:>7.3f} "
                f"{rec['min_expert_share']:>8.4f} {tps:>10,.0f} {now - t_start:>7.1f}s")
            ce_acc, aux_acc, n_acc = 0.0, 0.0, 0
            t_last = time.time()
        if elapsed > a.time_limit and step < a.steps:
            log(f"time limit {a.time_limit}s reached at step {step}")
            stopped_early = True
            break
    train_s = time.time() - t_start
    tokens_seen = step * a.batch * a.seq
    log(f"trained {step} steps, {tokens_seen / 1e6:.1f}M tokens in {train_s:.1f}s "
        f"({tokens_seen / train_s:,.0f} tok/s incl. periodic validation)")
    run_info["training"] = {"steps": step, "tokens": tokens_seen, "seconds": train_s,
                            "tok_per_s": tokens_seen / train_s, "stopped_early": stopped_early,
                            "history": hist}

    # 5. save (bf16)
    for m in model.modules():
        if "forward" in m.__dict__:
            del m.forward
    model.config._experts_implementation = "eager"
    model.eval()
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(hf_dir, safe_serialization=True)
    sizes = {f: os.path.getsize(os.path.join(hf_dir, f)) for f in sorted(os.listdir(hf_dir))}
    log("saved " + hf_dir + ": " + ", ".join(f"{f} {s:,}" for f, s in sizes.items()))
    del model, opt
    torch.cuda.empty_cache()
    if a.no_eval:
        with open(os.path.join(a.out, "train_log.json"), "w") as f:
            json.dump(run_info, f, indent=1)
            f.write("\n")
        log("done (--no-eval)")
        return

    # 6. reference perplexity of the saved checkpoint, reloaded, in float32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        ref = Qwen3_5MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                    experts_implementation="eager")
    except TypeError:
        ref = Qwen3_5MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    ref.config._experts_implementation = "eager"
    ref = ref.to(dev).eval()
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    from transformers import AutoTokenizer
    try:
        hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:  # noqa: BLE001
        log(f"AutoTokenizer failed ({type(e).__name__}: {e}); using PreTrainedTokenizerFast")
        from transformers import PreTrainedTokenizerFast
        hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf_dir, "tokenizer.json"),
                                         bos_token=EOT, eos_token=EOT, pad_token=EOT)
    log(f"tokenizer class {type(hf_tok).__name__}")
    chk = hf_tok(valid_text[:5000], add_special_tokens=False)["input_ids"]
    assert chk == tok.encode(valid_text[:5000], add_special_tokens=False).ids, "AutoTokenizer disagrees"
    valid_bytes = valid_text.encode("utf-8")
    ids_bytes = valid_ids.numpy().astype("<i4").tobytes()
    res = {
        "what": "HF transformers perplexity of the saved bf16 checkpoint (build/demo/hf), reloaded from disk, "
                "computed in float32 (eager attention, eager experts, TF32 off) on valid.txt",
        "procedure": "tokenise the whole valid.txt with hf/tokenizer.json (no special tokens added); split the "
                     "ids into non-overlapping windows of ctx tokens from the start, dropping the remainder; "
                     "evaluate each window from a fresh state (no cache, no BOS); score the NLL of the tokens at "
                     "window positions ctx/2 .. ctx-1, each predicted from the window's tokens before it; "
                     "ppl = exp(mean NLL); ppl_err = ppl * sqrt((mean(nll^2) - mean(nll)^2) / (n - 1)) as "
                     "llama.cpp prints it. llama_cpp_positions repeats this over positions ctx/2+1 .. ctx-1, "
                     "which is what llama.cpp's perplexity tool scores.",
        "checkpoint": "hf/model.safetensors (bf16)",
        "compute_dtype": "float32",
        "valid_sha256": hashlib.sha256(valid_bytes).hexdigest(),
        "valid_bytes": len(valid_bytes),
        "valid_tokens": valid_ids.numel(),
        "valid_token_ids_sha256": hashlib.sha256(ids_bytes).hexdigest() + " (int32 little-endian)",
        "valid_first_tokens": valid_ids[:32].tolist(),
        "versions": run_info["versions"],
        "device": run_info["device"],
        "results": [],
    }
    for ctx in (256, 512):
        t0 = time.time()
        r = perplexity(ref, valid_ids, ctx, 16, dev)
        log(f"HF ppl ctx {ctx}: {r['ppl']:.4f} +/- {r['ppl_err']:.4f} (windows {r['windows']}, scored "
            f"{r['tokens_scored']}, mean NLL {r['mean_nll']:.5f}); llama.cpp positions: "
            f"{r['llama_cpp_positions']['ppl']:.4f} +/- {r['llama_cpp_positions']['ppl_err']:.4f}; {time.time() - t0:.1f}s")
        res["results"].append(r)
    loads = expert_load(ref, valid_ids, a.seq, dev)
    mins = [min(l) for l in loads]
    maxs = [max(l) for l in loads]
    log("expert load on valid (fraction of routed slots; uniform = %.4f): per-layer min %s max %s"
        % (1 / cfg.num_experts, [round(v, 4) for v in mins], [round(v, 4) for v in maxs]))
    res["expert_load"] = {"uniform": 1 / cfg.num_experts, "per_layer": [[round(v, 5) for v in l] for l in loads]}
    with open(os.path.join(a.out, "hf_reference.json"), "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")

    # 7. generations (HF, float32 reloaded model)
    gens = []
    for p in PROMPTS:
        ids = torch.tensor([hf_tok(p, add_special_tokens=False)["input_ids"]], device=dev)
        out = ref.generate(ids, max_new_tokens=a.gen_tokens, do_sample=False)
        g = {"prompt": p, "prompt_ids": ids[0].tolist(), "mode": "greedy", "ids": out[0, ids.shape[1]:].tolist(),
             "text": hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)}
        gens.append(g)
        for seed in (1, 2):
            torch.manual_seed(seed)
            out = ref.generate(ids, max_new_tokens=a.gen_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                               top_k=0)
            gens.append({"prompt": p, "mode": f"sample T=0.8 top_p=0.95 seed={seed}",
                         "ids": out[0, ids.shape[1]:].tolist(),
                         "text": hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)})
    for g in gens:
        log(f"--- [{g['mode']}] {g['prompt']!r}\n{g['prompt']}{g['text']}")
    with open(os.path.join(a.out, "generations.json"), "w") as f:
        json.dump(gens, f, indent=1)
        f.write("\n")
    with open(os.path.join(a.out, "train_log.json"), "w") as f:
        json.dump(run_info, f, indent=1)
        f.write("\n")
    log("done")


if __name__ == "__main__":
    main()
