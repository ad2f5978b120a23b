"""A 128-token character-level tokenizer for grammar tests with tiny random models (no model download).

ids 0-3: <pad> <s> </s> <mask>; then "\\n" and the 95 printable ASCII characters, then multi-character
tokens (JSON punctuation, the tool-call markers, a few words) as added tokens, so a grammar often has
several tokenisations of the same text, as real vocabularies do. Decoding concatenates (no spaces added).
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<mask>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
MULTI = ['{"', '"}', '":', '": ', '", "', '",', ', ', ': ', "<tool_call>", "</tool_call>", '"name"', '"arguments"',
         "true", "false", "null", "\n{", "}\n", "in", "er", "th", "on", "an", "Paris", "London", "celsius",
         "  ", "}}", "00"]
VOCAB = SPECIALS + CHARS + MULTI
assert len(VOCAB) == 128, len(VOCAB)


def save_char_tokenizer(path: str | Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    base = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=base, merges=[], unk_token="<pad>"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MULTI])
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    fast.save_pretrained(str(path))
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = 512
    cfg_path.write_text(json.dumps(cfg, indent=2))
    assert len(fast) == len(VOCAB)


def make_char_model_dir(path: str | Path, **model_overrides) -> Path:
    """A tiny random llama under ``path`` with this character tokenizer (the grammar tests' model dir)."""
    from tests.helpers.tiny import make_tiny_hf_dir

    make_tiny_hf_dir(path, "llama", with_tokenizer=False, **model_overrides)
    save_char_tokenizer(path)
    return Path(path)
