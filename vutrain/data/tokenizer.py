"""A small byte-level BPE tokenizer trained on the shards' texts, loadable by ``AutoTokenizer``.

CLIP conventions: lower-case text (in the form tags are compared in: :func:`text_normalizer`),
``<|startoftext|>`` (bos) and ``<|endoftext|>`` (eos and pad) around every text. HF
``CLIPTextTransformer`` pools at the first eos, so padding with eos is harmless and truncation
must keep the eos as the last token (it does: the fast tokenizer reserves room for the
post-processor's special tokens when truncating). Special-token text inside
a caption is tokenized as text (``split_special_tokens``), so only the appended eos ends a caption.
No usable text to train on is a :class:`TokenizerTextError` (one line), not a bytes-only vocabulary.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vutrain.config import MIN_VOCAB_SIZE
from vutrain.tag_text import STRAY_JOINERS_PATTERN, invisible_format_pattern, without_lone_surrogates

from .captions import MAX_CAPTION_CHARS, _distinct_tags, caption_text, template_fields
from .labels import tag_values
from .samples import SkipCounter, SkipSample, decode_caption, decode_meta, image_member, iter_raw_samples
from .shards import expand_shards

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
log = logging.getLogger(__name__)


def train_bpe_tokenizer(
    texts: Iterable[str], out_dir: str, vocab_size: int = 4096, max_length: int = 32
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir`` (``save_pretrained``).

    Token ids: 0 = ``<|startoftext|>``, 1 = ``<|endoftext|>`` (also pad), then the 256 byte
    symbols and merges. On a small corpus the vocabulary may be smaller than ``vocab_size``:
    read ``len(tokenizer)``. A ``vocab_size`` below :data:`MIN_VOCAB_SIZE` (the byte alphabet and the
    two special tokens) is a :class:`TokenizerVocabError`, raised before ``texts`` is read.
    """
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.normalizer = text_normalizer()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = _Counted(texts)
    tok.train_from_iterator(seen, trainer=trainer)
    if not seen.count:
        # Trained on nothing (or on blank texts alone, which hold no word) it is the 256 byte symbols
        # alone: a run would train without a word on a vocabulary that knows no word.
        raise TokenizerTextError(
            "the tokenizer got no text to train on; check data.train_shards and data.caption_template"
        )
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=max_length,
        # Captions are data, never control tokens: a title holding the text "<|endoftext|>" was
        # read as an eos there, and CLIP pools at the first eos, so the rest of the caption was
        # dropped. Saved in tokenizer_config.json, so AutoTokenizer (eval, export) reads alike.
        split_special_tokens=True,
    )
    save_atomically(fast, out_dir)
    return fast


def text_normalizer() -> normalizers.Normalizer:
    """The preset tokenizer's text form: the one form of a tag (``tag_text.normalize_tag``), for
    captions and prompts alike.

    Zero-shot tag classes and the tag metrics' queries are tags in that form (NFKC, case-folded,
    whitespace runs as one space, stripped), while captions reach the tokenizer as the metadata
    writes them. With NFC and lower-casing alone, a title or ``{tags}`` holding full-width "ＧＴＡ５",
    "Straße", "Lets  Play" or upper-case Greek "ΟΔΟΣ" trained on other tokens than the prompts of
    the classes "gta5", "strasse", "lets play", "οδος": a class the model never saw written, without
    a word. Case folding is lower-casing here but for ß (German's one common difference), and a
    word-final capital sigma lowers to "ς" as Python's ``str.lower`` writes it.

    Invisible format characters go first, as ``normalize_tag`` drops them (one definition:
    ``tag_text.is_invisible_format``; ZWNJ and ZWJ kept between letters): a title with a zero-width
    space, a BOM or a soft hyphen ("I love \\u200bcats", "mu\\u00adsic") was tokenised apart from the
    same title without it (the word lost its leading-space token, or was cut in two), and from the
    prompts of its tags, which never hold them.
    """
    return normalizers.Sequence(
        [
            normalizers.Replace(Regex(invisible_format_pattern()), ""),
            normalizers.Replace(Regex(STRAY_JOINERS_PATTERN), ""),
            normalizers.NFKC(),
            normalizers.Replace(Regex(r"(?<=\p{L})\u03a3(?!\p{L})"), "\u03c2"),  # Σ ending a word
            normalizers.Lowercase(),
            normalizers.Replace("\u00df", "ss"),  # ß (ẞ lowers to it)
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )


class TokenizerTextError(ValueError):
    """No (usable) text to train the tokenizer on; the message is one line that says what to do."""


class TokenizerVocabError(ValueError):
    """A vocabulary size the byte-level BPE cannot honour; the message is one line naming the least."""


def check_vocab_size(vocab_size: int) -> None:
    """TokenizerVocabError unless ``vocab_size >= MIN_VOCAB_SIZE``.

    The trainer always keeps the whole byte alphabet (every text must stay encodable), so a smaller
    model.vocab_size (e.g. 100) gave a 258-token tokenizer without a word: the setting was not
    honoured, and a tokenizer without a single merge encodes every caption byte by byte.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerVocabError(
            f"model.vocab_size={vocab_size} is below {MIN_VOCAB_SIZE}, the least a byte-level BPE holds "
            f"(2 special tokens and 256 byte symbols); set model.vocab_size >= {MIN_VOCAB_SIZE} "
            "(a few thousand learns words)"
        )


class _Counted:
    """``texts`` as an iterable that counts the non-blank ones it yields (``count``), for the check
    after training."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.count = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if isinstance(text, str):
                text = without_lone_surrogates(text)  # as tokenize_batch will encode it
            self.count += isinstance(text, str) and bool(text.strip())
            yield text


TOKENIZER_FILE = "tokenizer.json"  # the trainer reuses a run's tokenizer when this file exists
_STAGING_PREFIX = ".partial-"


def save_atomically(tokenizer: PreTrainedTokenizerFast, out_dir: str) -> None:
    """``save_pretrained`` into ``out_dir`` so that a ``tokenizer.json`` there is always complete.

    A resumed run reuses the tokenizer when ``tokenizer.json`` exists. Saved in place, a rank 0
    killed (or out of disk) while writing it left a truncated file that every later start of the
    run then failed to parse. The files are written to a staging folder inside ``out_dir`` and
    moved in with ``os.replace``, ``tokenizer.json`` last; a staging folder a kill left is removed.
    """
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.startswith(_STAGING_PREFIX):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out_dir)
    try:
        tokenizer.save_pretrained(staging)
        for name in sorted(os.listdir(staging), key=lambda n: n == TOKENIZER_FILE):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def iter_shard_texts(shards: str, caption_template: str, limit: int | None = None) -> Iterator[str]:
    """Texts for tokenizer training: per sample its rendered caption, its tags and category name.

    Only the ``.json`` and ``.txt`` members are read (a local tar's images are seeked over: they
    were read in full, some 40x the text, on rank 0 before every other rank could start); samples
    training skips are skipped, for the same reasons, in the same order (:func:`_sample_texts`).
    ``limit`` caps the number of samples read; they come from shards spread over the whole list
    (:func:`spread_samples`).
    """
    template_fields(caption_template)  # fail fast on unknown placeholders
    skipped = SkipCounter()  # what the shard reader counts (ignored members, damaged shards) too
    lost: Counter[str] = Counter()  # the samples read that gave no caption, by reason
    read = 0
    for raw in spread_samples(expand_shards(shards), limit, skipped):
        read += 1
        try:
            texts = _sample_texts(raw, caption_template)
        except SkipSample as e:
            skipped(e.reason, str(e))
            lost[e.reason] += 1
            continue
        yield from texts
    _report_caption_count(read, lost, skipped - lost)


def _sample_texts(raw: dict, caption_template: str) -> list[str]:
    """A sample's caption, its tags and its category name(s); SkipSample where training skips it.

    Checked in training's order (``decode_sample_bytes``: metadata, caption, then the image
    member), so a sample is counted under the reason training counts it: a sample without an image,
    which training skips as ``missing_image``, gave the tokenizer its texts, and a shard of
    metadata alone trained a vocabulary on texts no step trains on. (An image that does not
    decode is found only by decoding it, which this reader does not do.)
    """
    meta = decode_meta(raw)
    caption = decode_caption(raw, meta, caption_template)
    image_member(raw)
    texts = [caption]
    # Read as the tag positives and the tag metrics read them: tags kept as one
    # comma-separated string (some metadata sources) were left out of the tokenizer's texts,
    # although eval/tags_* encodes every tag as a text query. Each tag once, as captions'
    # {tags}, the tag ids and the tag metrics count it: "Cats, cats, CATS" gave the BPE the
    # word three times for a sample that trains it once.
    tags = _distinct_tags(tag_values(meta.get("tags")))
    if tags:
        texts.append(", ".join(tags))
    # Cut as captions are: no step reads more of a text, and the BPE trainer's cost grows faster
    # than a word's length (one tag of 100k letters took 5 s, one of 1M over 5 minutes, on rank 0
    # while every other rank waited for the tokenizer).
    return [text[:MAX_CAPTION_CHARS] for text in texts + _category_texts(meta.get("category_name"))]


SPREAD_SHARDS = 16  # the least number of shards a limit's samples come from (when there are as many)
_TEXT_MEMBERS = {"json", "txt"}


def spread_samples(urls: list[str], limit: int | None, skipped: SkipCounter) -> Iterator[dict]:
    """Up to ``limit`` raw samples (all: None) of the shards ``urls``, read in :func:`spread_order`.

    The first ``min(len(urls), SPREAD_SHARDS, limit)`` shards of that order each give an even share
    of what the limit has left (``ceil(left / shards left)``), and a shard that gives less (short,
    damaged, missing) leaves the rest of its share to the next ones; past them, whole shards are read
    until the limit. A limit that holds that many whole shards reads exactly the whole shards it read
    before; one below a shard's samples read the first shard alone, so with ``A::B`` (or shards made
    one channel or one week after another) the vocabulary learnt one source. When every shard was
    opened and the limit is still not reached, the shards that stopped at their share are read on.
    """
    order = [urls[index] for index in spread_order(len(urls))]
    if limit is None:
        for url in order:
            yield from _shard_samples(url, skipped)
        return
    spread, left = min(len(order), SPREAD_SHARDS, limit), limit
    stopped: list[tuple[str, int]] = []  # (url, samples read) of shards that stopped at their share
    for position, url in enumerate(order):
        if not left:
            return
        share, taken = -(-left // max(spread - position, 1)), 0
        for raw in _shard_samples(url, skipped, most=share):
            taken, left = taken + 1, left - 1
            yield raw
        if taken == share:
            stopped.append((url, taken))
    for url, taken in stopped:
        if not left:
            return
        for raw in _shard_samples(url, skipped, after=taken, most=left):
            left -= 1
            yield raw


def _shard_samples(url: str, skipped: SkipCounter, after: int = 0, most: int | None = None) -> Iterator[dict]:
    """Up to ``most`` raw samples of shard ``url`` (its text members alone) after its first ``after``.

    The first ``after`` were read before: what they count (ignored members) is muted, not counted
    twice. The shard is closed where the samples end (a remote shard's download stops there).
    """
    samples = iter_raw_samples(url, skipped, payloads=_TEXT_MEMBERS)
    try:
        skipped.muted = True
        try:
            for _ in itertools.islice(samples, after):
                pass
        finally:
            skipped.muted = False
        yield from itertools.islice(samples, most)
    finally:
        samples.close()


def _category_texts(value) -> list[str]:
    """A ``category_name`` as the texts captions and zero-shot classes hold: NaN (pandas' missing
    value), a list or true went in as the texts "nan", "['music', 'film']", "True", words no caption
    or zero-shot prompt holds; a list gives each of its elements, as it gives each a class."""
    texts = (caption_text(v) for v in (value if isinstance(value, list) else [value]))
    return [t for t in texts if t and t.strip()]


def spread_order(n: int) -> list[int]:
    """The indices ``0 .. n-1`` so that every prefix is spread evenly over the range: 0, n/2, n/4,
    3n/4, ... (bit-reversed counting, the same order on every run).

    Read in list order, the tokenizer's ``limit`` samples were the first shards alone: with
    ``A::B`` (or shards built from inputs one country or channel after another) a large first
    source was the only text the BPE saw, and the other's captions, often another script, were
    encoded byte by byte into few words per context without a word said.
    """
    bits = max(n - 1, 0).bit_length()
    order = (int(format(i, f"0{bits}b")[::-1] or "0", 2) for i in range(1 << bits))
    return [i for i in order if i < n]


def _report_caption_count(read: int, lost: Counter[str], reader: Counter[str]) -> None:
    """TokenizerTextError when no sample gave a caption; a warning when any was skipped or the shard
    reader counted anything.

    ``lost``: the samples read that gave no caption, by reason (they and the captions add up to
    ``read``); ``reader``: what the shard reader counted besides (``ignored_member``: a member
    dropped from a sample that still gave its texts; ``tar_error``: a damaged shard whose rest was
    never read). Both were one "skipped" count, so the line said "40 of 40 samples read (skipped:
    {'tar_error': 1})". Shards whose every sample was bad trained a tokenizer on nothing (its 256
    byte symbols alone) without a word, and the run then trained on that vocabulary.
    """
    captions = read - sum(lost.values())
    if captions == 0:
        raise TokenizerTextError(
            f"none of the {read} samples read for the tokenizer gave a caption "
            f"({_skip_summary(lost, reader)}); check data.train_shards and data.caption_template"
        )
    if lost or reader:
        log.warning(
            "tokenizer trained on the captions of %d of %d samples read (%s)",
            captions,
            read,
            _skip_summary(lost, reader),
        )


def _skip_summary(lost: Counter[str], reader: Counter[str]) -> str:
    summary = f"{sum(lost.values())} skipped: {dict(lost) or 'none'}"
    if reader:
        summary += (
            f"; the shard reader also counted {dict(reader)}: dropped members and damaged shards, not samples"
        )
    return summary


def tokenize_batch(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize to fixed length: ``input_ids`` and ``attention_mask`` as LongTensor[B, max_length].

    Padded with eos on the right; truncated texts still end with eos (CLIP pools at the eos position).
    """
    enc = tokenizer(
        # A lone surrogate (half an emoji a JSON escape kept) is a TypeError in the Rust tokenizer:
        # one such title in a batch stopped the loader worker, and with it the run.
        [without_lone_surrogates(t) for t in texts],
        padding="max_length",
        # Whatever the tokenizer's saved padding_side: HF CLIP pools at the first eos (or the largest
        # id), which left padding with eos puts before the text, so every padded caption was pooled
        # at a pad token without an error.
        padding_side="right",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def make_tokenize(tokenizer, max_length: int) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """``texts -> tokenize_batch(tokenizer, texts, max_length)``, picklable for DataLoader workers."""
    import functools

    return functools.partial(tokenize_batch, tokenizer, max_length=max_length)
