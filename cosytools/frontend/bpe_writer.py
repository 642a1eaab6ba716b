"""Write a small random byte-level BPE ``CosyVoice-BlankEN`` tokenizer folder (for ``init-model``).

The folder has the real Qwen2 id layout: ``vocab.json`` padded with unreachable
``<|filler_N|>`` entries to 151643 ids, then ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644,
``<|im_end|>`` 151645 in ``tokenizer_config.json``; CosyVoice3's ``<|endofprompt|>`` then lands
at 151646. Like the real folder it has no ``tokenizer.json``.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Union

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from .tokenizer import QWEN2_PRETOKENIZE_REGEX

__all__ = ["write_tiny_bpe", "QWEN2_BPE_SIZE", "QWEN2_ADDED_TOKENS", "tiny_corpus"]

log = logging.getLogger(__name__)

#: number of BPE entries in Qwen2's vocab.json (ids 0..151642).
QWEN2_BPE_SIZE = 151643
#: Qwen2's added tokens right after the BPE entries.
QWEN2_ADDED_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Speech synthesis turns written text into natural sounding audio. Modern systems first predict discrete
speech tokens with a language model, then render a mel spectrogram with flow matching, and finally a
vocoder produces the waveform you hear through your speakers or headphones.
It was a bright cold day in April, and the clocks were striking thirteen. She said, "Don't worry, we'll
be there by seven o'clock!" He replied: 'I'm not sure that's right; they've already left.'
Please call me at 555-0123 or write to support@example.com before Friday, June 14th, 2024.
The meeting starts at 9:30 a.m. and ends around 11:45 a.m.; lunch is served at noon.
Prices rose by 3.5% last year, from $1,299.99 to $1,345.50, while wages grew only 2%.
Hello, world! This is a small test of the tokenizer, with numbers like 42, 3.14159 and 1e-6.
What time is it? Where are you going? Why not! Well... maybe tomorrow, or the day after.
Reading books, writing letters, singing songs and walking in the park are the things I enjoy most.
Once upon a time, in a small village near the mountains, there lived an old clockmaker and his
granddaughter. Every morning they opened the shop, wound the clocks, and listened to them ticking in
harmony. Travellers who passed through the valley often stopped to admire the beautiful machines.
Researchers evaluate voices with listening tests, measuring naturalness, similarity and intelligibility;
they also compute word error rates with an automatic recogniser and speaker similarity with embeddings.
Could you recommend a good restaurant nearby? We would like something quiet, with vegetarian options.
Thank you very much for your help yesterday, I really appreciate it and hope to see you again soon.
The library opens early on weekdays; visitors borrow novels, magazines, newspapers and dictionaries.
Engineers profile kernels, compare outputs layer by layer, and fix the first place where numbers diverge.
"""

_CHINESE = """\
今天天气很好，我们一起去公园散步吧。
语音合成技术可以把文字转换成自然流畅的声音。
希望你以后能够做得比我还好。
明天上午九点在三楼会议室开会，请大家准时参加。
我喜欢在周末读书、听音乐，还有和朋友一起做饭。
春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
床前明月光，疑是地上霜。举头望明月，低头思故乡。
这个模型先预测语音标记，然后通过流匹配生成梅尔频谱，最后由声码器得到波形。
北京是中国的首都，有着悠久的历史和丰富的文化。
他每天早上六点起床，跑步半个小时，然后吃早饭去上班。
请把窗户关上，外面下雨了，风也很大。
这家餐厅的菜又便宜又好吃，我们下次再来吧。
图书馆周一到周五开放，周末需要提前预约。
小明在学校认真学习，老师和同学都很喜欢他。
火车站离这里不远，走路大概十分钟就到了。
"""

_JAPANESE = """\
東京の天気は明日も晴れるでしょう。
今日はとても暑いですね。冷たい飲み物はいかがですか？
ありがとうございます。またよろしくお願いします！
私は毎朝コーヒーを飲みながら新聞を読みます。
音声合成の研究は、とても面白いと思います。
カタカナとひらがなと漢字を混ぜて書きます。
週末は友達と一緒に山へ行く予定です。
この電車は次の駅で止まりますか？
"""

_MISC = """\
0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024 2048 65536 3.14 2.718 -1 +1 1/2 3/4 50% 99.9%
! " # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~
“quoted” ‘single’ — – … · • « » ¿ ¡ ， 。 、 ！ ？ ： ； （ ） 「 」 『 』 【 】
café naïve résumé façade Über Straße Ångström señor crème brûlée
Привет, как дела? Γειά σου κόσμε. 안녕하세요. مرحبا بالعالم. नमस्ते दुनिया.
Tabs\tand  spaces   and
newlines\r\nare kept.
"""


def tiny_corpus(seed: int = 0) -> list[str]:
    """The built-in multilingual training text (deterministic for a given seed)."""
    rng = random.Random(seed)
    lines = [ln for block in (_ENGLISH, _CHINESE, _JAPANESE, _MISC) for ln in block.split("\n") if ln]
    # the seed varies the corpus a little: random numbers, dates and re-ordered English words
    words = _ENGLISH.split()
    extra = []
    for _ in range(40):
        extra.append(f"{rng.randint(0, 99999)} {rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}/"
                     f"{rng.randint(1990, 2030)} {rng.uniform(0, 1000):.2f}")
        extra.append(" ".join(rng.choice(words) for _ in range(12)))
    # repeat the natural text so its merges dominate the random lines
    return lines * 4 + extra


def _build_trainer_tokenizer() -> Tokenizer:
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok


def write_tiny_bpe(folder: Union[str, os.PathLike], seed: int = 0, vocab_target: int = 2000) -> Path:
    """Train a small byte-level BPE and write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``.

    ``vocab_target`` caps the trained entries (256 byte symbols + merges); the vocab is then padded
    to 151643 ids. The folder is created if needed; ``config.json`` is not touched, and a stale
    ``tokenizer.json`` is removed (it would shadow the files written here). Returns the folder.
    """
    if not 256 <= vocab_target <= QWEN2_BPE_SIZE:
        raise ValueError(f"vocab_target must be in [256, {QWEN2_BPE_SIZE}], got {vocab_target}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)

    tok = _build_trainer_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_target, min_frequency=2, show_progress=False,
                                  special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  continuing_subword_prefix="", end_of_word_suffix="")
    tok.train_from_iterator(tiny_corpus(seed), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    trained: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    n = len(trained)
    if sorted(trained.values()) != list(range(n)):
        raise RuntimeError("BPE trainer returned non-contiguous ids")  # tokenizers invariant; never expected

    vocab = dict(sorted(trained.items(), key=lambda kv: kv[1]))
    for i in range(n, QWEN2_BPE_SIZE):
        vocab[f"<|filler_{i}|>"] = i

    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(out / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)

    added = {
        str(QWEN2_BPE_SIZE + k): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for k, c in enumerate(QWEN2_ADDED_TOKENS)
    }
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN2_ADDED_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": QWEN2_ADDED_TOKENS[0],
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": QWEN2_ADDED_TOKENS[0],
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    stale = out / "tokenizer.json"
    if stale.exists():
        log.warning("%s: removing tokenizer.json (it would shadow the written vocab.json/merges.txt)", out)
        stale.unlink()
    log.info("wrote tiny BPE to %s (%d trained entries, %d merges)", out, n, len(merges))
    return out
