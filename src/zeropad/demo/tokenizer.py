"""An offline character-level tokenizer for the built-in demo run (nothing is downloaded).

Byte-level BPE with the 256-byte alphabet and no merges: every ASCII character is exactly one
token, any other text falls back to its UTF-8 bytes, so every string round-trips exactly.

The vision demo adds Qwen-VL's four vision special tokens after the text ones (`vision=True`), so the
text demo's token ids (and its 259-row embedding) stay as they are.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
VIDEO_PAD_TOKEN = "<|video_pad|>"
VISION_TOKENS = (VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN, VIDEO_PAD_TOKEN)

# ChatML, as Qwen uses it, without a default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_level_tokenizer(vision: bool, extra_tokens: tuple[str, ...]) -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: ord(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting is needed when nothing merges.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # Added tokens take the next ids in order: 256.. for the text ones, then the vision ones, then the extra ones.
    tok.add_special_tokens(list(SPECIAL_TOKENS + (VISION_TOKENS if vision else ()) + tuple(extra_tokens)))
    return tok


def build_tokenizer(
    out_dir: str | Path, vision: bool = False, extra_tokens: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Build the demo tokenizer, save it to `out_dir` (AutoTokenizer loads it) and return it.

    vision: also add <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|> (ids 259..262).
    extra_tokens: special tokens added last, one id each (the drawing demo's pixel tokens and image markers).
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(vision, extra_tokens),
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return tokenizer
