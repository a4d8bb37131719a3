"""Load documents (PDF, plain text, Markdown) as one normalised string.

A `Document` keeps enough structure to cite an answer: the character offset where
each PDF page starts, or (for text files) the original file's line numbers.

Normalisation:
* text files: ``\\r\\n`` and lone ``\\r`` become ``\\n`` (Python's universal newlines),
  a UTF-8 BOM is dropped; nothing else changes, so line N of `text` is line N of
  the file on disk.
* PDFs: per page, NULs are removed, newlines normalised as above, runs of more than
  two blank lines collapsed to two, and the page is stripped; pages are joined
  with ``"\\n\\n"``. A page without text is an empty page that still has a start.

Every problem a user can fix raises `DocumentError` with a one-line message naming
the file and a hint saying what to do.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from landmark_cli.errors import DocumentError

DocumentKind = Literal["pdf", "text", "markdown"]

SUPPORTED_SUFFIXES: dict[str, DocumentKind] = {
    ".pdf": "pdf",
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
}

PAGE_SEPARATOR = "\n\n"

# pypdf logs a WARNING for every quirk it repairs (bad xref offsets, missing EOF
# markers, ...); a file it can read is fine for us, and a file it cannot read
# raises, which we turn into a DocumentError.
logging.getLogger("pypdf").setLevel(logging.ERROR)

_SUPPORTED_LIST = ", ".join(sorted(SUPPORTED_SUFFIXES))
_BLANK_LINE_RUN = re.compile(r"\n(?:[ \t]*\n){3,}")  # a newline, then 3+ blank lines
_NON_TEXT_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # all but \t \n \v \f \r
_QPDF_HINT = "decrypt it first, e.g. `qpdf --decrypt --password=PASSWORD in.pdf out.pdf`"


@dataclass(frozen=True)
class Document:
    """A loaded document. Offsets are indices into `text` (Python str indices)."""

    path: Path  # resolved path
    kind: DocumentKind
    text: str = field(repr=False)
    # PDFs: offset in `text` where page i+1 starts (page_starts[0] == 0); () for text files.
    page_starts: tuple[int, ...] = field(repr=False)
    sha256: str  # hex digest of `text` encoded as UTF-8

    @property
    def page_count(self) -> int:
        """Number of PDF pages (0 for text files)."""
        return len(self.page_starts)

    @cached_property
    def _line_starts(self) -> tuple[int, ...]:
        starts = [0]
        text = self.text
        i = text.find("\n")
        while i != -1 and i + 1 < len(text):  # no line starts after a final newline
            starts.append(i + 1)
            i = text.find("\n", i + 1)
        return tuple(starts)

    @property
    def line_count(self) -> int:
        return len(self._line_starts)

    def _check_offset(self, offset: int) -> None:
        if not 0 <= offset <= len(self.text):
            raise ValueError(f"offset {offset} outside 0..{len(self.text)} of {self.path.name}")

    def line_of(self, offset: int) -> int:
        """1-based line that contains `offset` (a newline belongs to the line it ends)."""
        self._check_offset(offset)
        return bisect.bisect_right(self._line_starts, offset)

    def page_of(self, offset: int) -> int:
        """1-based PDF page that contains `offset` (a page separator belongs to the page before)."""
        if not self.page_starts:
            raise ValueError(f"{self.path.name} is a {self.kind} file and has no pages")
        self._check_offset(offset)
        return bisect.bisect_right(self.page_starts, offset)

    def locate(self, start: int, end: int) -> tuple[int | None, tuple[int, int] | None]:
        """Where the span [start, end) of `text` is in the original document.

        PDFs: ``(page, None)``, the 1-based page of `start`.
        Text and Markdown: ``(None, (first_line, last_line))``, 1-based and inclusive.
        """
        if not 0 <= start <= end <= len(self.text):
            raise ValueError(f"span [{start}, {end}) outside 0..{len(self.text)} of {self.path.name}")
        if self.page_starts:
            return self.page_of(start), None
        return None, (self.line_of(start), self.line_of(max(start, end - 1)))


def load_document(path: str | Path) -> Document:
    """Read a supported file into a `Document`; raise `DocumentError` if it cannot be used."""
    given = Path(path).expanduser()
    shown = str(path)
    try:
        resolved = given.resolve()
        if not resolved.exists():
            raise DocumentError(f"{shown}: no such file", hint="check the path and its spelling")
        if resolved.is_dir():
            raise DocumentError(
                f"{shown} is a directory, not a file",
                hint=f"to use every document in a folder, run `landmark index {shown}`",
            )
        kind = SUPPORTED_SUFFIXES.get(given.suffix.lower())
        if kind is None:
            what = f"'{given.suffix}' files" if given.suffix else "files without an extension"
            raise DocumentError(
                f"{shown}: {what} are not supported",
                hint=f"supported: {_SUPPORTED_LIST}; convert the file, or rename it if it is plain text",
            )
        if resolved.stat().st_size == 0:
            raise _empty(shown)
        if kind == "pdf":
            text, page_starts = _read_pdf(resolved, shown)
        else:
            text, page_starts = _read_text(resolved, shown), ()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DocumentError(f"cannot read {shown}: {reason}", hint="check that the file is readable") from exc
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Document(path=resolved, kind=kind, text=text, page_starts=page_starts, sha256=digest)


def find_documents(directory: str | Path) -> list[Path]:
    """Every supported file below `directory`, sorted; hidden files and folders are skipped."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise DocumentError(f"{root} {problem}", hint="pass a folder that contains documents")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            candidate = Path(dirpath, name)
            if not name.startswith(".") and candidate.suffix.lower() in SUPPORTED_SUFFIXES and candidate.is_file():
                found.append(candidate)
    return sorted(found)


# --- text files ---------------------------------------------------------------------


def _read_text(path: Path, shown: str) -> str:
    text = _normalise_newlines(_decode_text(path.read_bytes(), shown))
    if not text.strip():
        raise _empty(shown)
    return text


def _decode_text(data: bytes, shown: str) -> str:
    """UTF-8 (with or without BOM), UTF-16 with BOM, else Windows-1252 if it clearly is text."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            raise _binary(shown, data, "is not valid UTF-16") from None
        if not _looks_like_text(text):
            raise _binary(shown, data, "contains control characters")
        return text
    if b"\x00" in data:
        raise _binary(shown, data, "contains NUL bytes")
    try:
        return data.decode("utf-8-sig")  # plain UTF-8, minus a leading BOM if there is one
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("cp1252")  # a superset of Latin-1's printable characters
    except UnicodeDecodeError:
        raise _binary(shown, data, "is not valid UTF-8") from None
    if not _looks_like_text(text):
        raise _binary(shown, data, "is not valid UTF-8")
    return text


def _looks_like_text(text: str) -> bool:
    return _NON_TEXT_CONTROLS.search(text) is None


def _binary(shown: str, data: bytes, reason: str) -> DocumentError:
    if data.startswith(b"%PDF-"):
        hint = "it looks like a PDF: rename it to .pdf"
    else:
        hint = "it looks binary; give a UTF-8 text file, or a PDF with a .pdf name"
    return DocumentError(f"{shown} {reason}, so it cannot be read as text", hint=hint)


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _empty(shown: str) -> DocumentError:
    return DocumentError(f"{shown} is empty", hint="add some text to it, or pick another file")


# --- PDFs ---------------------------------------------------------------------------


def _read_pdf(path: Path, shown: str) -> tuple[str, tuple[int, ...]]:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError

    page = 0  # the page being read, for the error message
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            # Many PDFs are "encrypted" with an empty user password and open like this.
            raise DocumentError(f"{shown} is an encrypted PDF that needs a password", hint=_QPDF_HINT)
        pages: list[str] = []
        for pdf_page in reader.pages:
            page += 1
            pages.append(_normalise_pdf_page(pdf_page.extract_text() or ""))
    except (DocumentError, MemoryError):
        raise
    except DependencyError as exc:  # AES encryption without the `cryptography` package
        raise DocumentError(
            f"{shown} is encrypted with AES, which needs the `cryptography` package",
            hint=f"`pip install cryptography`, or {_QPDF_HINT}",
        ) from exc
    except Exception as exc:  # pypdf raises many kinds of errors on broken files
        where = f" (page {page})" if page else ""
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise DocumentError(
            f"{shown} is not a readable PDF{where}: {first_line}",
            hint="check that it opens in a PDF viewer; re-save it or repair it, e.g. `qpdf in.pdf out.pdf`",
        ) from exc

    if not pages:
        raise DocumentError(f"{shown} has no pages", hint="check that the PDF is complete")
    if not any(pages):
        raise DocumentError(
            f"{shown} has no extractable text; it may be a scanned image",
            hint="run OCR on it first, e.g. `ocrmypdf in.pdf out.pdf`",
        )
    starts: list[int] = []
    offset = 0
    for text in pages:
        starts.append(offset)
        offset += len(text) + len(PAGE_SEPARATOR)
    return PAGE_SEPARATOR.join(pages), tuple(starts)


def _normalise_pdf_page(raw: str) -> str:
    text = _normalise_newlines(raw.replace("\x00", ""))
    # Lone surrogates (from broken font maps) would make `text.encode("utf-8")` fail.
    text = text.encode("utf-8", "replace").decode("utf-8")
    return _BLANK_LINE_RUN.sub("\n\n\n", text).strip()
