"""Where a record's images and videos are, in either record shape, rewritten to one: text with `<image>` and
`<video>` placeholders plus the list of paths each kind fills in order.

  (a) placeholders in the text and `images` / `videos` lists of paths relative to the data file (the shape of
      LLaMA-Factory's mllm_demo.json and mllm_video_demo.json);
  (b) OpenAI-style content parts: a message's content is a list of {"type": "text", "text": ...},
      {"type": "image_url", "image_url": {"url": ...}}, {"type": "image", "image": path},
      {"type": "video_url", "video_url": {"url": ...}} or {"type": "video", "video": path}, in any order.

Only local files are read (a path or a file:// URL). Images and videos keep separate orders: the model takes
images and videos as two lists and fills the image and video tokens of the text from them in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from zeropad.data.sources import json_type
from zeropad.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

PLACEHOLDERS = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}  # medium -> its placeholder
_MEDIA_PARTS = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}  # part type -> medium


@dataclass(frozen=True)
class MediaRefs:
    """A record's media as written in it, in the order of their placeholders."""

    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()


def with_placeholders(record: dict, file: str, record_no: int) -> tuple[dict, MediaRefs]:
    """The record in shape (a): content parts (shape b) rewritten as text with placeholders; and its media refs."""
    lists = {field: _path_list(record, field, file, record_no) for field in ("images", "videos")}
    messages = record.get("messages")
    if not isinstance(messages, list) or not any(isinstance(m, dict) and isinstance(m.get("content"), list)
                                                 for m in messages):
        return record, MediaRefs(lists["images"], lists["videos"])
    for field, refs in lists.items():
        if refs:
            raise DataError(file, record_no, f"media given both as content parts and in '{field}'; use one of them")
    rewritten, refs = [], {"image": [], "video": []}
    for i, message in enumerate(messages, start=1):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            rewritten.append(message)
            continue
        texts = []
        for j, part in enumerate(content, start=1):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in _MEDIA_PARTS:
                medium = _MEDIA_PARTS[kind]
                refs[medium].append(_part_ref(part, kind, medium, where, file, record_no))
                texts.append(PLACEHOLDERS[medium])
            else:
                got = f"type '{kind}'" if isinstance(kind, str) else f"a JSON {json_type(part)}"
                raise DataError(file, record_no, f"{where} must be a text, image_url, image, video_url or video "
                                                 f"part, got {got}")
        rewritten.append({**message, "content": "".join(texts)})
    return {**record, "messages": rewritten}, MediaRefs(tuple(refs["image"]), tuple(refs["video"]))


def resolve(ref: str, data_file: str | Path) -> Path:
    """The file a media ref names: absolute, or relative to the data file's folder; file:// URLs unquoted."""
    if ref.startswith("file://"):
        ref = unquote(ref[len("file://"):])
    path = Path(ref)
    return path if path.is_absolute() else Path(data_file).parent / path


def _path_list(record: dict, field: str, file: str, record_no: int) -> tuple[str, ...]:
    refs = record.get(field) or []
    if not isinstance(refs, list) or not all(isinstance(x, str) for x in refs):
        raise DataError(file, record_no, f"field '{field}' must be a list of path strings")
    return tuple(refs)


def _part_ref(part: dict, kind: str, medium: str, where: str, file: str, record_no: int) -> str:
    value = part.get(kind)
    url = value.get("url") if kind.endswith("_url") and isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        shape = "a path string" + (" or {'url': path}" if kind.endswith("_url") else "")
        raise DataError(file, record_no, f"{where} has no {medium} path ('{kind}' must be {shape})")
    if url.startswith("data:") or ("://" in url and not url.startswith("file://")):
        raise DataError(file, record_no, f"{where}: only local {medium} files are read (a path or file:// URL), "
                                         f"got '{url[:40]}'; download remote or inline {medium}s first")
    return url
