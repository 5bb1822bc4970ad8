"""mkdocs hook: links from a docs page to a file of the repository outside docs/ keep their text only.

The pages in docs/ are read on the repository browser too, where ``[configs/demo.yaml](../configs/demo.yaml)``
works; the site has no copy of such files, and ``mkdocs build --strict`` would reject the link. A link whose
target exists nowhere is left alone, so a broken link still fails the strict build.
"""

from __future__ import annotations

import re
from pathlib import Path

_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")
_FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs = Path(config["docs_dir"]).resolve()
    here = (docs / page.file.src_path).parent

    def unlink(match: re.Match) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return match.group(0)
        path = (here / target).resolve()
        if path.is_relative_to(docs) or not path.exists():
            return match.group(0)
        return match.group(1)

    # Odd-numbered chunks between fences are code blocks: left as written.
    chunks = _FENCE.split(markdown)
    out, in_code = [], False
    for chunk in chunks:
        if _FENCE.fullmatch(chunk):
            in_code = not in_code
            out.append(chunk)
        else:
            out.append(chunk if in_code else _LINK.sub(unlink, chunk))
    return "".join(out)
