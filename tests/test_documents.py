from __future__ import annotations

import codecs
import hashlib
import logging
from pathlib import Path

import pytest
from pdf_fixtures import make_blank_pdf, make_encrypted_pdf, make_text_pdf, text_pdf_bytes

from landmark_cli.documents import (
    SUPPORTED_SUFFIXES,
    Document,
    find_documents,
    load_document,
)
from landmark_cli.errors import DocumentError

LINES = [f"line {n}: some words on line number {n}" for n in range(1, 9)]


def span_of(doc: Document, needle: str) -> tuple[int, int]:
    start = doc.text.index(needle)
    return start, start + len(needle)


def expect_error(path: Path, *words: str) -> DocumentError:
    with pytest.raises(DocumentError) as info:
        load_document(path)
    err = info.value
    assert path.name in err.message
    assert "\n" not in err.message
    assert err.hint
    for word in words:
        assert word in str(err).lower(), f"{word!r} not in {str(err)!r}"
    return err


# --- text and markdown ------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "kind"), [(".txt", "text"), (".md", "markdown"), (".text", "text"), (".markdown", "markdown")]
)
def test_text_files_load_with_their_kind(tmp_path: Path, suffix: str, kind: str) -> None:
    path = tmp_path / f"notes{suffix}"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    doc = load_document(path)
    assert doc.kind == kind
    assert doc.path == path.resolve()
    assert doc.text == "\n".join(LINES) + "\n"
    assert doc.page_starts == ()
    assert doc.sha256 == hashlib.sha256(doc.text.encode("utf-8")).hexdigest()


def test_locate_maps_text_spans_to_original_lines(tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    doc = load_document(path)
    start = doc.text.index("line 3")
    end = doc.text.index("line 5") + len(LINES[4])
    assert doc.locate(start, end) == (None, (3, 5))
    # a span that ends with line 5's newline is still lines 3..5; one into line 6 is not
    assert doc.locate(start, end + 1) == (None, (3, 5))
    assert doc.locate(start, end + 2) == (None, (3, 6))
    assert doc.locate(0, 1) == (None, (1, 1))
    assert doc.locate(*span_of(doc, LINES[-1])) == (None, (8, 8))
    assert doc.locate(len(doc.text), len(doc.text)) == (None, (8, 8))  # empty span at the end
    assert doc.line_count == 8


def test_blank_lines_in_text_files_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "gaps.txt"
    path.write_text("first\n\n\n\n\n\nseventh\n", encoding="utf-8")
    doc = load_document(path)
    assert doc.locate(*span_of(doc, "seventh")) == (None, (7, 7))


def test_crlf_and_cr_are_normalised_without_changing_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "windows.txt"
    path.write_bytes(b"one\r\ntwo\r\n\r\nfour\rfive\r\n")
    doc = load_document(path)
    assert doc.text == "one\ntwo\n\nfour\nfive\n"
    assert doc.locate(*span_of(doc, "four")) == (None, (4, 4))
    assert doc.locate(*span_of(doc, "five")) == (None, (5, 5))


def test_utf8_bom_is_dropped_and_non_ascii_kept(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes(codecs.BOM_UTF8 + "Grüße\nnaïve café\n".encode())
    doc = load_document(path)
    assert doc.text == "Grüße\nnaïve café\n"


def test_utf16_with_bom_and_windows_1252_text_are_read(tmp_path: Path) -> None:
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("hello\nwörld\n".encode("utf-16"))  # BOM + NUL bytes, yet text
    assert load_document(utf16).text == "hello\nwörld\n"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 \u201cquoted\u201d\n".encode("cp1252"))
    assert load_document(latin).text == "café “quoted”\n"


def test_load_accepts_str_paths(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("hi\n", encoding="utf-8")
    assert load_document(str(path)).text == "hi\n"


# --- PDFs -------------------------------------------------------------------------


def test_pdf_pages_are_located(tmp_path: Path) -> None:
    pages = [
        "Alpha page talks about apples.",
        "Beta page talks about bananas.\nA second line.",
        "Gamma page about cherries.",
    ]
    doc = load_document(make_text_pdf(tmp_path / "fruit.pdf", pages))
    assert doc.kind == "pdf"
    assert doc.page_count == 3
    assert doc.page_starts[0] == 0
    for number, word in enumerate(["apples", "bananas", "cherries"], start=1):
        assert doc.locate(*span_of(doc, word)) == (number, None)
    for number, start in enumerate(doc.page_starts, start=1):
        assert doc.text[start:].startswith(pages[number - 1].split()[0])
        assert doc.page_of(start) == number
    # the separator after a page belongs to that page
    assert doc.page_of(doc.page_starts[1] - 1) == 1
    assert "\n\n".join(pages) == doc.text
    assert doc.sha256 == hashlib.sha256(doc.text.encode("utf-8")).hexdigest()


def test_pdf_empty_page_still_has_a_start(tmp_path: Path) -> None:
    doc = load_document(make_text_pdf(tmp_path / "gap.pdf", ["first page", "", "third page"]))
    assert doc.page_count == 3
    assert doc.locate(*span_of(doc, "third")) == (3, None)
    assert doc.locate(*span_of(doc, "first")) == (1, None)


def test_pdf_text_is_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pypdf import PageObject

    raw = ["a\r\nb\x00c\n\n\n\n\n\nd  ", "\n\n  second\rpage"]
    pages = iter(raw)
    monkeypatch.setattr(PageObject, "extract_text", lambda self, *a, **k: next(pages))
    doc = load_document(make_text_pdf(tmp_path / "raw.pdf", ["x", "y"]))
    assert doc.text == "a\nbc\n\n\nd\n\nsecond\npage"
    assert doc.page_starts == (0, len("a\nbc\n\n\nd\n\n"))


def test_empty_password_pdf_opens(tmp_path: Path) -> None:
    path = make_encrypted_pdf(tmp_path / "open.pdf", user_password="", pages=["Readable by anyone."])
    doc = load_document(path)
    assert "Readable by anyone." in doc.text


def test_pdf_with_user_password_fails(tmp_path: Path) -> None:
    path = make_encrypted_pdf(tmp_path / "locked.pdf", user_password="hunter2")
    err = expect_error(path, "encrypted", "qpdf")
    assert "password" in err.message


def test_aes_pdf_without_cryptography_gets_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pypdf
    from pypdf.errors import DependencyError

    def needs_cryptography(*args: object, **kwargs: object) -> None:
        raise DependencyError("cryptography>=3.1 is required for AES algorithm")

    monkeypatch.setattr(pypdf.PdfReader, "__init__", needs_cryptography)
    expect_error(make_text_pdf(tmp_path / "aes.pdf", ["x"]), "encrypted", "cryptography")


def test_blank_pdf_is_reported_as_scanned(tmp_path: Path) -> None:
    expect_error(make_blank_pdf(tmp_path / "scan.pdf", n_pages=2), "scanned", "ocr")


@pytest.mark.parametrize(
    "content",
    [b"this is not a pdf at all", b"%PDF-1.4\n garbage garbage", text_pdf_bytes(["half a file"])[:300]],
    ids=["not-a-pdf", "header-only", "truncated"],
)
def test_corrupt_pdf_fails(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(content)
    expect_error(path, "not a readable pdf")


def test_pdf_that_pypdf_repairs_loads_without_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = text_pdf_bytes(["still readable"])
    cut = data.rfind(b"startxref")
    path = tmp_path / "badxref.pdf"
    path.write_bytes(data[:cut] + b"startxref\n99999\n%%EOF\n")  # wrong xref offset
    with caplog.at_level(logging.WARNING):
        doc = load_document(path)
    assert doc.text == "still readable"
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]


# --- errors -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nowhere.txt", "no such file")


def test_directory_points_to_index(tmp_path: Path) -> None:
    folder = tmp_path / "folder.pdf"
    folder.mkdir()
    expect_error(folder, "directory", "landmark index")


@pytest.mark.parametrize("name", ["slides.pptx", "README"])
def test_unsupported_suffix_lists_supported(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("content\n", encoding="utf-8")
    err = expect_error(path, "not supported")
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in (err.hint or "")


def test_uppercase_suffix_is_supported(tmp_path: Path) -> None:
    path = tmp_path / "SHOUT.TXT"
    path.write_text("hello\n", encoding="utf-8")
    assert load_document(path).kind == "text"


@pytest.mark.parametrize(("name", "content"), [("empty.txt", b""), ("blank.md", b" \n\t\r\n  \n"), ("empty.pdf", b"")])
def test_empty_files(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    expect_error(path, "is empty")


@pytest.mark.parametrize(
    "content",
    [
        b"text\x00with a NUL",
        bytes(range(256)) * 4,
        b"\x89PNG\r\n\x1a\n\x07\x01\x02" + b"\xff\xfe\x9d" * 40,
        b"\xe9t\xe9 \x01\x02\x03\x1b\x1c",  # valid Windows-1252, but control characters
    ],
    ids=["nul", "all-bytes", "png-ish", "cp1252-controls"],
)
def test_binary_text_files_fail(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    expect_error(path, "binary")


def test_pdf_named_txt_gets_rename_hint(tmp_path: Path) -> None:
    path = tmp_path / "paper.txt"
    path.write_bytes(text_pdf_bytes(["x"]))
    expect_error(path, "rename it to .pdf")


def test_locate_rejects_spans_outside_the_text(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("abc\n", encoding="utf-8")
    doc = load_document(path)
    for start, end in [(-1, 2), (2, 1), (0, 5)]:
        with pytest.raises(ValueError):
            doc.locate(start, end)
    with pytest.raises(ValueError):
        doc.page_of(0)


# --- find_documents ---------------------------------------------------------------


def test_find_documents_skips_hidden_and_unsupported(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    for rel in [
        "b.txt",
        "a.PDF",
        "sub/c.md",
        "sub/deeper/d.markdown",
        "sub/e.text",
        "image.png",
        "notes.docx",
        ".hidden.txt",
        ".git/HEAD.txt",
        "sub/.cache/f.md",
    ]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x\n", encoding="utf-8")
    (root / "folder.md").mkdir()  # a directory with a supported suffix is not a document
    (root / "dangling.txt").symlink_to(root / "gone.txt")  # a broken link is not a document
    found = find_documents(root)
    assert [p.relative_to(root).as_posix() for p in found] == [
        "a.PDF",
        "b.txt",
        "sub/c.md",
        "sub/deeper/d.markdown",
        "sub/e.text",
    ]


def test_find_documents_inside_a_hidden_parent(tmp_path: Path) -> None:
    root = tmp_path / ".config" / "docs"
    root.mkdir(parents=True)
    (root / "a.txt").write_text("x\n", encoding="utf-8")
    assert find_documents(root) == [root / "a.txt"]


def test_find_documents_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match="does not exist"):
        find_documents(tmp_path / "missing")
    file = tmp_path / "a.txt"
    file.write_text("x\n", encoding="utf-8")
    with pytest.raises(DocumentError, match="not a directory"):
        find_documents(file)
