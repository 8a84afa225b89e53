"""Tokenizers that work offline and save beside the model.

Saved as a plain `tokenizer.json` with a built-in `tokenizer_class`, they load with no remote code:
`PreTrainedTokenizerFast.from_pretrained(folder_or_repo_id)` anywhere, and `AutoTokenizer.from_pretrained(folder)`
where the `gptb` package is imported (elsewhere AutoTokenizer first reads the folder's config.json, GPTB's remote code,
and asks whether to run it).

Both are byte-level, like GPT-2's: any text becomes bytes first, so nothing is ever unknown and
`decode(encode(text)) == text` for any string. Special tokens come first in both vocabularies:

    id 0  <|endoftext|>  bos, eos and unk (GPT-2's convention)
    id 1  <|pad|>        padding only. Not eos: DataCollatorForLanguageModeling sets the labels of pad tokens to
                         -100, so with pad = eos the model would never learn to end a document.

Padding is on the left, the side batched generation needs. `model_max_length` is unbounded: a recurrent model
has no context limit.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (the alphabet of tokenizers' ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:  # control characters and spaces get the code points after 255, in order
            chars[byte] = chr(256 + shift)
            shift += 1
    return [chars[byte] for byte in range(256)]


def _byte_level(model: models.Model) -> Tokenizer:
    """A tokenizer around `model` with GPT-2's byte-level pre-tokenizer, decoder and post-processor."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=VERY_LARGE_INTEGER,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # True (4.x default) turns " ." into "." on decode: no round trip
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2's scheme) on `texts` with the `tokenizers` library.

    Deterministic: the same texts give the same vocabulary and merges. The vocabulary holds the two special
    tokens, the 256 byte symbols and up to `vocab_size - 258` merges (fewer if the texts run out of pairs seen
    `min_frequency` times); `len(tokenizer)` is the size to give the model.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an integer >= 258 (256 bytes + 2 special tokens), got {vocab_size!r}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=_bytes_to_unicode(),  # every byte, seen in the texts or not
        show_progress=False,
    )
    tokenizer = _byte_level(models.BPE())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 258-token tokenizer with no training: the two special tokens, then byte b as id b + 2. For fast tests."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: byte + len(SPECIAL_TOKENS) for byte, char in enumerate(_bytes_to_unicode())})
    tokenizer = _byte_level(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # already in the vocabulary: marks them special, same ids
    return _wrap(tokenizer)


def token_config_kwargs(tokenizer) -> dict[str, int]:
    """The `GPTBConfig` fields that must agree with `tokenizer`: vocab_size and the bos/eos/pad token ids."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
