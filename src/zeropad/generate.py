"""Talk to a trained model: `zeropad chat` (interactive, streamed) and `zeropad generate` (a JSONL of prompts).

A model is final/, an exported directory, a checkpoint (LoRA adapters merged, as export does) or an output
directory (its final/, else its newest checkpoint). Prompts go through the chat template with the generation
prompt; a vision-language model's images and videos go through the training path (placeholders, the run's
image processor, exact visual tokens), so the model sees its input as it did in training. Hugging Face
`generate` runs with its KV cache. Prompts of one length are batched together, so no padding is needed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from zeropad.config import Config, ModelConfig, VideoConfig
from zeropad.data.chat import Sample, chat_template_for, ensure_chat_template
from zeropad.data.formats import Conversation, Message, to_conversation
from zeropad.data.multimodal import load_image_processor
from zeropad.data.sources import iter_records
from zeropad.errors import DataError, ZeropadError
from zeropad.family import is_multimodal
from zeropad.model.load import auto_class
from zeropad.train.state import MANIFEST

PROMPT_FILE = "<chat>"  # the `file` named by errors about interactive input


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}


@dataclass
class Prompt:
    """One prompt: its messages (no reply yet), the tools the model may call, and media as in training records."""

    conversation: Conversation
    images: list[str] = dataclasses.field(default_factory=list)
    videos: list[str] = dataclasses.field(default_factory=list)
    file: str = PROMPT_FILE  # image and video paths are relative to it
    record_no: int = 1


@dataclass
class Chatter:
    """A loaded model with what it needs to turn prompts into model inputs and outputs back into text."""

    model: torch.nn.Module
    tokenizer: object
    processor: object | None  # the image processor of a vision-language model
    video: VideoConfig
    template_kwargs: dict = dataclasses.field(default_factory=dict)  # variables for the chat template

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        return sorted({*ids, self.tokenizer.eos_token_id})

    def inputs(self, prompt: Prompt) -> dict:
        """Model kwargs for one prompt, batch of 1: input_ids ending with the generation prompt, and media."""
        if self.processor is None:
            if prompt.images or prompt.videos:
                raise ZeropadError("this model has no vision tower: --image and --video need a vision-language model")
            conv = prompt.conversation
            # The template training used: for tools and a ChatML template without them, zeropad's built-in one.
            text = self.tokenizer.apply_chat_template(conv.as_dicts(), tools=list(conv.tools) or None,
                                                      chat_template=chat_template_for(conv, self.tokenizer),
                                                      tokenize=False, add_generation_prompt=True,
                                                      **self.template_kwargs)
            ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
            return {"input_ids": ids}
        return self._vision_inputs(prompt)

    def _vision_inputs(self, prompt: Prompt) -> dict:
        # The training path tokenizes conversations that end in a reply; the prompt is what precedes the
        # reply's first target token, which is where the generation prompt ends (zeropad.data.turns).
        from zeropad.data.vision import read_image_conversation, to_vision_doc
        from zeropad.model.vlm import unpacked_inputs

        reply = Conversation((*prompt.conversation.messages, Message("assistant", ".")), prompt.conversation.tools)
        record = {"messages": reply.as_dicts(), "tools": list(reply.tools), "images": prompt.images,
                  "videos": prompt.videos}
        where = {"file": prompt.file, "record_no": prompt.record_no}
        conv = read_image_conversation(record, self.tokenizer, self.model.config, video=self.video,
                                       template_kwargs=self.template_kwargs, **where)
        doc = to_vision_doc(conv, self.processor, self.model.config, **where)
        targets = np.flatnonzero(doc.loss_mask)
        gaps = np.flatnonzero(np.diff(targets) > 1)
        cut = int(targets[gaps[-1] + 1] if len(gaps) else targets[0])  # the first target of the last reply
        return unpacked_inputs(self.model, Sample(doc.input_ids[:cut], doc.loss_mask[:cut], doc.media))

    @torch.no_grad()
    def generate(self, inputs: dict, settings: Settings, streamer=None) -> list[str]:
        """The reply to each row of inputs["input_ids"] (rows of equal length, sharing no padding)."""
        ids = inputs["input_ids"].to(self.device)
        kwargs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        out = self.model.generate(**kwargs, attention_mask=torch.ones_like(ids), use_cache=True, streamer=streamer,
                                  eos_token_id=self.eos_ids, pad_token_id=pad, **settings.generate_kwargs())
        return [self.decode(row) for row in out[:, ids.shape[1]:].tolist()]

    def decode(self, token_ids: list[int]) -> str:
        """Generated ids -> text: up to the first end-of-turn token, special tokens dropped."""
        stops = [i for i, t in enumerate(token_ids) if t in self.eos_ids]
        return self.tokenizer.decode(token_ids[: stops[0]] if stops else token_ids, skip_special_tokens=True)


def load_chatter(path: str | Path, device: str = "auto", dtype: str = "auto",
                 template_kwargs: dict | None = None) -> Chatter:
    """The model at `path` (final/, an exported directory, a checkpoint or an output directory), in eval mode.
    The chat template, its variables (unless `template_kwargs` is given) and the video settings are the run's
    (a checkpoint's config, or the config.json beside final/), else the model directory's own."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ZeropadError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    model_dir, checkpoint = _resolve(Path(path))
    if checkpoint is not None:
        from zeropad.train.export import load_trained_model, run_config

        model, run = load_trained_model(checkpoint), run_config(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint / "tokenizer", trust_remote_code=run.model.trust_remote_code)
    else:
        config = AutoConfig.from_pretrained(model_dir)
        model = auto_class(config).from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        run = Config(model=ModelConfig(path=str(model_dir)))
        beside = model_dir.parent / "config.json"  # an output directory's resolved run config
        if model_dir.name == "final" and beside.is_file():
            trained = Config.model_validate_json(beside.read_text())
            run = run.model_copy(update={"data": trained.data, "video": trained.video})
    if tokenizer.eos_token_id is None:
        raise ZeropadError(f"{path}: the tokenizer has no eos_token, so a reply has no end")
    ensure_chat_template(tokenizer, run.data.chat_template)
    processor = load_image_processor(run, model.config) if is_multimodal(model.config) else None
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    kwargs = run.data.chat_template_kwargs if template_kwargs is None else template_kwargs
    return Chatter(model, tokenizer, processor, run.video, kwargs)


def _resolve(path: Path) -> tuple[Path | None, Path | None]:
    """(Hugging Face model directory, None) or (None, checkpoint directory)."""
    from zeropad.train.export import resolve_checkpoint

    if not path.is_dir():
        raise ZeropadError(f"{path}: no such model directory")
    if (path / MANIFEST).is_file() or path.name.startswith("step_"):
        return None, path
    if (path / "final" / "config.json").is_file():
        return path / "final", None
    if (path / "config.json").is_file():
        return path, None
    return None, resolve_checkpoint(path)  # an output directory with checkpoints only, or a clear error


def read_prompts(path: str | Path) -> Iterator[tuple[Prompt, dict, str | None]]:
    """(prompt, record, reference reply or None) per record: {"prompt": text} (optional "system"), or a record of
    any training format; a record ending in an assistant turn has that turn as its reference, not its prompt."""
    file = str(path)
    for record_no, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        if isinstance(record.get("prompt"), str):
            system = record.get("system")
            messages = ((Message("system", system),) if isinstance(system, str) and system else ()) + (
                Message("user", record["prompt"]),)
            conversation, reference = Conversation(messages), None
        else:
            conversation = to_conversation(record, "auto", file, record_no, require_reply=False)
            if not isinstance(conversation, Conversation):
                raise DataError(file, record_no, "a 'text' record is no prompt: use 'prompt' or 'messages'")
            reference = None
            if conversation.messages[-1].role == "assistant":
                reference = conversation.messages[-1].content
                conversation = dataclasses.replace(conversation, messages=conversation.messages[:-1])
        media = {k: record.get(k) or [] for k in ("images", "videos")}
        yield Prompt(conversation, media["images"], media["videos"], file, record_no), record, reference


def generate_file(chatter: Chatter, prompts_path: str | Path, out_path: str | Path, settings: Settings,
                  batch_size: int = 32, progress: bool = True) -> tuple[int, int]:
    """Write each record with its "response" to out_path (JSONL, in input order); return (matching the reference
    after strip, records with a reference)."""
    from tqdm import tqdm

    items = list(read_prompts(prompts_path))
    groups: dict[tuple, list[int]] = {}  # equal-length text prompts batch without padding; media prompts alone
    encoded = []
    for i, (prompt, _, _) in enumerate(items):
        inputs = chatter.inputs(prompt)
        encoded.append(inputs)
        key = (inputs["input_ids"].shape[1],) if len(inputs) == 1 else ("media", i)
        groups.setdefault(key, []).append(i)
    responses: list[str] = [""] * len(items)
    with tqdm(total=len(items), disable=not progress, desc="generate", unit="prompt") as bar:
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start: start + batch_size]
                batch = {k: torch.cat([encoded[i][k] for i in chunk]) for k in encoded[chunk[0]]}
                for i, text in zip(chunk, chatter.generate(batch, settings)):
                    responses[i] = text
                bar.update(len(chunk))
    matches = with_reference = 0
    with Path(out_path).open("w") as f:
        for (_, record, reference), response in zip(items, responses):
            f.write(json.dumps({**record, "response": response}, ensure_ascii=False) + "\n")
            if reference is not None:
                with_reference += 1
                matches += response.strip() == reference.strip()
    return matches, with_reference


def chat_loop(chatter: Chatter, settings: Settings, system: str | None = None, images: list[str] | None = None,
              videos: list[str] | None = None) -> None:
    """Read turns from stdin, stream each reply to stdout; /reset clears the history, /exit (or end of input)
    quits. Images and videos (paths relative to the working directory) belong to the first user turn."""
    from transformers import TextStreamer

    from zeropad.data.media_parts import PLACEHOLDERS

    images, videos = list(images or []), list(videos or [])
    media_text = PLACEHOLDERS["image"] * len(images) + PLACEHOLDERS["video"] * len(videos)
    opening = (Message("system", system),) if system else ()
    history: tuple[Message, ...] = opening
    print("chat: /reset clears the history, /exit quits")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            history = opening
            print("(history cleared)")
            continue
        if not line:
            continue
        first = not any(m.role == "user" for m in history)
        history += (Message("user", media_text + line if first else line),)
        prompt = Prompt(Conversation(history), images, videos)
        streamer = TextStreamer(chatter.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = chatter.generate(chatter.inputs(prompt), settings, streamer)[0]
        history += (Message("assistant", reply),)
