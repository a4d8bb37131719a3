"""Make small PDFs for tests: text pages (fpdf2), blank pages and encrypted files (pypdf)."""

from __future__ import annotations

import io
from pathlib import Path

from fpdf import FPDF
from pypdf import PdfReader, PdfWriter


def text_pdf_bytes(pages: list[str]) -> bytes:
    """A PDF with one page per string (ASCII; core font Helvetica; long lines wrap)."""
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=False)  # one string is exactly one page
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        if text:
            pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def make_text_pdf(path: Path, pages: list[str]) -> Path:
    path.write_bytes(text_pdf_bytes(pages))
    return path


def make_blank_pdf(path: Path, n_pages: int = 1) -> Path:
    """A PDF whose pages have no text at all, like a scan without OCR."""
    writer = PdfWriter()
    for _ in range(n_pages):
        writer.add_blank_page(width=595, height=842)
    with path.open("wb") as fh:
        writer.write(fh)
    return path


def make_encrypted_pdf(
    path: Path,
    user_password: str,
    pages: list[str] | None = None,
    owner_password: str = "owner-secret",
) -> Path:
    """A text PDF encrypted with RC4-128 (pypdf's default; needs no `cryptography`).

    With ``user_password=""`` anyone can open it; only the owner password is secret.
    """
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf_bytes(pages or ["Encrypted text."]))))
    writer.encrypt(user_password=user_password, owner_password=owner_password)
    with path.open("wb") as fh:
        writer.write(fh)
    return path
