"""Parity fixtures for the frozen text encoders (`diffusiond::nn::text`).

Imported by gen_fixtures.py (`python3 scripts/gen_fixtures.py --only text`), which
runs it inside .venv-fixtures with transformers pinned. Writes tests/fixtures/text/:

  tiny-bert/          a random BertModel (transformers' keys, safetensors) + its tokenizer
  tiny-t5/            a random T5EncoderModel (t5-v1_1 style, gated-gelu) + its tokenizer
  tiny-t5-sharded/    a T5ForConditionalGeneration whose encoder equals tiny-t5's, saved in
                      shards: tests the index loader and that decoder.* / lm_head.* are ignored
  tiny-t5-relu/       a T5EncoderModel with the original T5's non-gated ReLU feed-forward
  tiny-clip/          a random CLIPTextModelWithProjection (quick_gelu, causal) + a CLIP-style
                      BPE tokenizer (</w> word ends, start/end-of-text, padded with end-of-text)
  reference.safetensors, reference.json
                      token ids, masks and `last_hidden_state` from transformers, for the
                      tiny models and for the real all-MiniLM-L6-v2 (read from models/, which
                      scripts/fetch_encoder.py fills; its weights are not committed)

Determinism: one intra-op thread, float32, fixed seeds, eager attention. The tiny
tokenizers are built here from explicit vocabularies (no training), so the files
are reproducible; they mimic the real ones' structure (BERT: WordPiece with
[CLS] … [SEP]; T5: a SentencePiece-style Unigram with "▁" and a final </s>).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (AutoModel, AutoTokenizer, BertConfig, BertModel, CLIPTextConfig,
                          CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config, T5EncoderModel,
                          T5ForConditionalGeneration)

PROMPTS = [
    "a red circle on top of a blue square",
    "A photograph of an astronaut riding a horse, in the style of Monet!",
    "",
    "zebra",
    "two dogs and three cats sitting under a large green tree next to a small house by the river at sunset",
    "Crème brûlée café — naïve façade?",
]
WORDS = ("a an the of on in at by to and under next top red blue green circle square photograph astronaut riding "
         "horse style monet two three dogs cats sitting large small tree house river sunset zebra").split()
PUNCT = list("!,.?—-'")
LETTERS = list("abcdefghijklmnopqrstuvwxyz")

CLIP_MAX = 20
BERT_MAX = 24  # max_position_embeddings: also the tokenizer's default max length
T5_MAX = 16
MINILM_SHORT = 32  # the real model's hidden states are compared at this length (size)


def bert_tokenizer(dest: Path) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + WORDS + PUNCT + LETTERS + ["##" + c for c in LETTERS] + ["##s", "##ing"]
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=BERT_MAX)
    fast.save_pretrained(dest)
    return fast


def t5_tokenizer(dest: Path) -> PreTrainedTokenizerFast:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -5.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    pieces += [("▁", -8.0)] + [(c, -10.0) for c in LETTERS + PUNCT] + [("s", -9.0), ("ing", -9.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" +", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   model_max_length=512)
    fast.save_pretrained(dest)
    return fast


def clip_tokenizer(dest: Path) -> PreTrainedTokenizerFast:
    # Characters only, no merges: BPE then spells each word, the last character
    # marked </w> as CLIP marks word ends. End-of-text is the highest id, as in
    # OpenAI's vocabulary (the original configs' pooling relies on it).
    vocab = list(dict.fromkeys(LETTERS + PUNCT + [c + "</w>" for c in LETTERS + PUNCT]))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.BPE(ids, [], unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", pair="<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
        special_tokens=[("<|startoftext|>", ids["<|startoftext|>"]), ("<|endoftext|>", ids["<|endoftext|>"])])
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|startoftext|>", eos_token="<|endoftext|>", model_max_length=CLIP_MAX)
    fast.save_pretrained(dest)
    return fast


def tiny_clip(out: Path, tensors: dict, meta: dict) -> None:
    dest = out / "tiny-clip"
    tok = clip_tokenizer(dest)
    torch.manual_seed(3)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=40, projection_dim=24,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_MAX,
                         bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos, attn_implementation="eager")
    model = CLIPTextModelWithProjection(cfg).eval()
    perturb_norms(model, torch.Generator().manual_seed(4))
    model.save_pretrained(dest, safe_serialization=True)
    ids, mask = encode(tok, CLIP_MAX)
    with torch.no_grad():
        out_p = model(input_ids=ids, attention_mask=mask)
    tensors.update({"tiny-clip/prompts/input_ids": ids, "tiny-clip/prompts/attention_mask": mask,
                    "tiny-clip/prompts/last_hidden_state": out_p.last_hidden_state.contiguous(),
                    "tiny-clip/prompts/text_embeds": out_p.text_embeds.contiguous()})
    # The original configs' rule (eos_token_id 2: the highest id is end-of-text), on ids not from the tokenizer.
    model.config.eos_token_id = 2
    model.text_model.eos_token_id = 2
    ids, mask = direct_inputs(cfg.vocab_size, 12, torch.Generator().manual_seed(5))
    with torch.no_grad():
        out_d = model(input_ids=ids, attention_mask=mask)
    tensors.update({"tiny-clip/direct/input_ids": ids, "tiny-clip/direct/attention_mask": mask,
                    "tiny-clip/direct/last_hidden_state": out_d.last_hidden_state.contiguous(),
                    "tiny-clip/direct/text_embeds": out_d.text_embeds.contiguous()})
    meta["tiny-clip"] = {"max_length": CLIP_MAX, "eos_token_id": eos}


def perturb_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Random init leaves LayerNorm weights at 1 and biases at 0, which would let a
    bug in their use go unnoticed; give them random values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))


def encode(tok: PreTrainedTokenizerFast, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As diffusers' IF pipeline calls its tokenizer."""
    out = tok(PROMPTS, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
              return_tensors="pt")
    return out.input_ids, out.attention_mask


@torch.no_grad()
def hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).last_hidden_state.contiguous()


def direct_inputs(vocab: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids not from a tokenizer, with masks the tokenizer never makes: zeros in the
    middle and a row with a single visible key."""
    ids = torch.randint(0, vocab, (3, length), generator=gen)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    mask[1, 2:5] = 0
    mask[1, -1] = 0
    mask[2, 1:] = 0
    return ids, mask


def tiny_bert(out: Path, tensors: dict, meta: dict) -> None:
    dest = out / "tiny-bert"
    tok = bert_tokenizer(dest)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=BERT_MAX, type_vocab_size=2,
                     initializer_range=0.2, layer_norm_eps=1e-12, hidden_act="gelu",
                     attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=True).eval()
    perturb_norms(model, torch.Generator().manual_seed(1))
    model.save_pretrained(dest, safe_serialization=True)
    ids, mask = encode(tok, BERT_MAX)
    tensors.update({"tiny-bert/prompts/input_ids": ids, "tiny-bert/prompts/attention_mask": mask,
                    "tiny-bert/prompts/last_hidden_state": hidden(model, ids, mask)})
    ids, mask = direct_inputs(cfg.vocab_size, 10, torch.Generator().manual_seed(2))
    tensors.update({"tiny-bert/direct/input_ids": ids, "tiny-bert/direct/attention_mask": mask,
                    "tiny-bert/direct/last_hidden_state": hidden(model, ids, mask)})
    meta["tiny-bert"] = {"max_length": BERT_MAX}


def t5_config(vocab: int, feed_forward_proj: str) -> T5Config:
    return T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj=feed_forward_proj, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                    attn_implementation="eager")


def tiny_t5(out: Path, tensors: dict, meta: dict) -> None:
    tok = t5_tokenizer(out / "tiny-t5")
    for extra in ["tiny-t5-sharded", "tiny-t5-relu"]:
        t5_tokenizer(out / extra)
    torch.manual_seed(3)
    full = T5ForConditionalGeneration(t5_config(len(tok), "gated-gelu")).eval()
    perturb_norms(full, torch.Generator().manual_seed(4))
    # Small shards so that even this tiny model spans several files.
    full.save_pretrained(out / "tiny-t5-sharded", safe_serialization=True, max_shard_size="40KB")
    model = T5EncoderModel.from_pretrained(out / "tiny-t5-sharded", attn_implementation="eager").eval()
    model.save_pretrained(out / "tiny-t5", safe_serialization=True)

    ids, mask = encode(tok, T5_MAX)
    ref = hidden(model, ids, mask)
    assert torch.equal(ref, full.encoder(input_ids=ids, attention_mask=mask).last_hidden_state), "encoders differ"
    tensors.update({"tiny-t5/prompts/input_ids": ids, "tiny-t5/prompts/attention_mask": mask,
                    "tiny-t5/prompts/last_hidden_state": ref})
    ids, mask = direct_inputs(len(tok), 12, torch.Generator().manual_seed(5))
    tensors.update({"tiny-t5/direct/input_ids": ids, "tiny-t5/direct/attention_mask": mask,
                    "tiny-t5/direct/last_hidden_state": hidden(model, ids, mask)})
    # Longer than relative_attention_max_distance, so the last bucket is reached.
    ids = torch.randint(0, len(tok), (1, 150), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    tensors.update({"tiny-t5/long/input_ids": ids, "tiny-t5/long/attention_mask": mask,
                    "tiny-t5/long/last_hidden_state": hidden(model, ids, mask)})

    torch.manual_seed(7)
    relu = T5EncoderModel(t5_config(len(tok), "relu")).eval()
    perturb_norms(relu, torch.Generator().manual_seed(8))
    relu.save_pretrained(out / "tiny-t5-relu", safe_serialization=True)
    ids, mask = encode(tok, T5_MAX)
    tensors.update({"tiny-t5-relu/prompts/input_ids": ids, "tiny-t5-relu/prompts/attention_mask": mask,
                    "tiny-t5-relu/prompts/last_hidden_state": hidden(relu, ids, mask)})
    meta["tiny-t5"] = {"max_length": T5_MAX}


def minilm(root: Path, tensors: dict, meta: dict) -> None:
    src = root / "models" / "all-MiniLM-L6-v2"
    if not (src / "model.safetensors").is_file():
        raise SystemExit(f"{src} is missing: run `make encoder` first")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src, attn_implementation="eager", dtype=torch.float32).eval()
    max_len = model.config.max_position_embeddings
    ids, mask = encode(tok, max_len)
    tensors.update({"minilm/full/input_ids": ids, "minilm/full/attention_mask": mask})
    ids, mask = encode(tok, MINILM_SHORT)
    tensors.update({"minilm/short/input_ids": ids, "minilm/short/attention_mask": mask,
                    "minilm/short/last_hidden_state": hidden(model, ids, mask)})
    meta["minilm"] = {"max_length": max_len, "short_max_length": MINILM_SHORT, "tokenizer": type(tok).__name__}


def generate(out: Path, root: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for sub in ["tiny-bert", "tiny-t5", "tiny-t5-sharded", "tiny-t5-relu", "tiny-clip"]:
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"transformers": transformers.__version__, "torch": torch.__version__,
                  "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__, "prompts": PROMPTS}
    tiny_bert(out, tensors, meta)
    tiny_t5(out, tensors, meta)
    tiny_clip(out, tensors, meta)
    minilm(root, tensors, meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "reference.safetensors"))
    (out / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {len(tensors)} reference tensors to {out} ({size / 1e6:.2f} MB in all)")
