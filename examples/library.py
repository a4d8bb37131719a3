"""Assemble the example library: a folder of 11 real documents (about 65k tokens) for
`landmark index` / `landmark ask DIR`.

    python examples/library.py /tmp/library
    landmark index /tmp/library
    landmark ask /tmp/library "When was the Apache License, Version 2.0 published?"

It holds the company history examples/lantern_bay.pdf (77 pages), the six essays of
examples/essays/ (one as a 10-page PDF, built from its Markdown with build_pdf.py: where
an essay has a PDF, the library takes the PDF) and four licence texts (examples/licenses/: GPL-3, LGPL-2.1, Apache-2.0,
MPL-2.0, copied verbatim from Debian's /usr/share/common-licenses; their licences allow
verbatim copies). Files are hard-linked where possible, else copied.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTENTS = {"lantern_bay.pdf": "lantern_bay.pdf", "essays": "essays", "licenses": "licenses"}


def build(dest: Path) -> Path:
    """Create (or refresh) the library at `dest`; returns it."""
    dest.mkdir(parents=True, exist_ok=True)
    for source in CONTENTS.values():
        src = HERE / source
        files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.suffix in (".md", ".txt", ".pdf")
                                                   and not (p.suffix != ".pdf" and p.with_suffix(".pdf").exists()))
        for f in files:
            target = dest / f.relative_to(HERE)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                continue
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/library.py DEST_FOLDER")
    print(build(Path(sys.argv[1])))
