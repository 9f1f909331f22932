"""Exploration runner for steering variants the engine does not offer yet (docs/benchmarks.md, "What else was tried").

    .venv/bin/python bench/steering_until.py additive_until 0.14 40 14   # until the concept is written, <= 14 tokens
    .venv/bin/python bench/steering_until.py clamp 0.25 20               # clamp the concept component to 0.25 x n_l
    .venv/bin/python bench/steering_until.py additive 0.14 20 12         # the first 12 generated tokens only

Arguments: mode (additive, clamp, additive_until), strength (x each layer's residual norm),
number of features (the bench's most coherent concept features), optional cap on steered decode steps.
The demo SAE's concept directions are added at layers 8-23 on generated positions through plain forward
hooks around `transformers.generate` (greedy, 40 tokens, the bench's 5 prompts); hit rate and fluency as in
bench/steering_quality.py. "until": a row stops being steered once it emits one of its label tokens.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch

torch.set_num_threads(1)
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from engine.assets import steering_quality as q  # noqa: E402
from engine.calibration_sweep import embedding_coherence  # noqa: E402
from engine.steering_layers import NORM_PROBE_TEXT, residual_norms  # noqa: E402

mode, alpha, nfeat = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
out = str(Path(__file__).resolve().parent.parent / "var" / "assets" / "demo")
tok = AutoTokenizer.from_pretrained(out + "/model")
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(out + "/model", dtype=torch.float32).eval()
labels = json.loads(Path(out + "/sae/feature_labels.json").read_text())
_cd = load_file(out + "/sae/concept_directions.safetensors")
C, TOK = _cd["concept_directions"], _cd["token_ids"]
until = mode.endswith("until")
norms = residual_norms(model, tok(NORM_PROBE_TEXT)["input_ids"])
prompts = list(q.NEUTRAL_PROMPTS)
def chat(p):
    return tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
enc = tok([chat(p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad():
    base = model.generate(**enc, max_new_tokens=40, do_sample=False)
base_txt = [tok.decode(r[enc.input_ids.shape[1]:], skip_special_tokens=True) for r in base]
feats = q.concept_features(((r["index"], r["label"]) for r in labels), count=nfeat, exclude_words=base_txt,
                           coherence=lambda w: embedding_coherence(model, tok, w))
layers = [8, 11, 14, 17, 20, 23]
rows_c = torch.stack([C[i] for i, _ in feats for _ in prompts])  # (B, d)
state = {"step": 0}
first_n = int(sys.argv[4]) if len(sys.argv) > 4 else 10**9
def hook_at(l):  # noqa: E741
    def hook(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        if h.shape[1] != 1:  # prefill: generated_only
            state["step"] = 0
            return None
        if l == layers[0]:
            state["step"] += 1
        if state["step"] > first_n:
            return None
        c = rows_c[: h.shape[0]].unsqueeze(1)
        tau = alpha * norms[l]
        gate = (~state["done"][: h.shape[0]]).float().view(-1, 1, 1) if until else 1.0
        if mode == "clamp":
            proj = (h * c).sum(-1, keepdim=True)
            h2 = h + (tau - proj).clamp_min(0) * c
        else:
            h2 = h + gate * tau * c
        return (h2, *o[1:]) if isinstance(o, tuple) else h2
    return hook
hs = [model.model.layers[l].register_forward_hook(hook_at(l)) for l in layers]  # noqa: E741
encb = tok([chat(p) for _ in feats for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
t = time.monotonic()
outs = []
B = 50
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402


class Latch(LogitsProcessor):
    """Marks a row done once its last token is one of its concept tokens (steering stops from there)."""
    def __call__(self, input_ids, scores):
        chosen = scores.argmax(-1, keepdim=True)  # greedy: the token this step emits, the next step's input
        state["done"] |= (chosen == state["tok"]).any(1)
        return scores
for s in range(0, encb.input_ids.shape[0], B):
    rows_c = torch.stack([C[i] for i, _ in feats for _ in prompts])[s:s+B]
    state["tok"] = torch.stack([TOK[i] for i, _ in feats for _ in prompts])[s:s+B]
    state["done"] = torch.zeros(rows_c.shape[0], dtype=torch.bool)
    with torch.no_grad():
        g = model.generate(input_ids=encb.input_ids[s:s+B], attention_mask=encb.attention_mask[s:s+B], max_new_tokens=40, do_sample=False, logits_processor=LogitsProcessorList([Latch()]))
    outs += [r[encb.input_ids.shape[1]:].tolist() for r in g]
    print(s, time.monotonic() - t, flush=True)
eos = tok.eos_token_id
ids = [[x for x in r if x != eos and x != tok.pad_token_id] for r in outs]
txt = [tok.decode(r, skip_special_tokens=True) for r in ids]
answers = {i: txt[k*5:(k+1)*5] for k, (i, _) in enumerate(feats)}
rate = q.hit_rate(answers, dict(feats))
fl = sum(q.is_fluent(r) for r in ids)
print(f"{mode} alpha={alpha} first_n={first_n}: hit {rate*100:.1f}% fluency {fl}/{len(ids)}", flush=True)
Path(f"/tmp/steering_until_{mode}_{alpha}_{first_n}.json").write_text(json.dumps({"answers": answers, "words": dict(feats)}))
