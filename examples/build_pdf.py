#!/usr/bin/env python3
"""Render the Lantern Bay example document from Markdown to PDF.

Usage: python examples/build_pdf.py [src.md] [out.pdf]

Only the small subset of Markdown used by the example is understood:
"# " for the book title, "## " for chapter headings, and paragraphs
separated by blank lines. Requires the fpdf2 package (pip install fpdf2).
"""
import sys
from pathlib import Path

from fpdf import FPDF

HERE = Path(__file__).resolve().parent
DEFAULT_SRC = HERE / "lantern_bay.md"
DEFAULT_OUT = HERE / "lantern_bay.pdf"

BODY_SIZE = 11      # Helvetica 11pt for paragraphs
LINE_HEIGHT = 6     # mm between lines of body text
PARA_GAP = 2.5      # extra mm after each paragraph


class BookPDF(FPDF):
    def footer(self):
        self.set_y(-14)
        self.set_font("Helvetica", "", 9)
        self.cell(0, 8, str(self.page_no()), align="C")


def parse_blocks(text):
    """Yield (kind, text) pairs: kind is 'title', 'heading' or 'para'."""
    para = []
    for line in text.splitlines() + [""]:
        line = line.rstrip()
        if not line or line.startswith("#"):
            if para:
                yield "para", " ".join(para)
                para = []
            if line.startswith("## "):
                yield "heading", line[3:].strip()
            elif line.startswith("# "):
                yield "title", line[2:].strip()
        else:
            para.append(line.strip())


def latin1(text):
    # The core fonts only cover Latin-1; the source is meant to be ASCII.
    return text.encode("latin-1", "replace").decode("latin-1")


def build(src, out):
    pdf = BookPDF(format=(148, 210))  # A5 in mm
    pdf.set_margins(18, 18, 18)
    pdf.set_auto_page_break(True, margin=20)
    for kind, text in parse_blocks(Path(src).read_text(encoding="utf-8")):
        text = latin1(text)
        if kind == "title":
            pdf.set_title(text)
            pdf.add_page()
            pdf.set_y(70)
            pdf.set_font("Helvetica", "B", 20)
            pdf.multi_cell(0, 10, text, align="C", new_x="LMARGIN", new_y="NEXT")
        elif kind == "heading":
            pdf.add_page()
            pdf.set_font("Helvetica", "B", 14)
            pdf.multi_cell(0, 8, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(4)
        else:
            if pdf.page_no() == 0:
                pdf.add_page()
            pdf.set_font("Helvetica", "", BODY_SIZE)
            pdf.multi_cell(0, LINE_HEIGHT, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(PARA_GAP)
    pdf.output(str(out))
    return pdf.page_no()


def main(argv):
    src = Path(argv[1]) if len(argv) > 1 else DEFAULT_SRC
    out = Path(argv[2]) if len(argv) > 2 else DEFAULT_OUT
    pages = build(src, out)
    print(f"wrote {out} ({pages} pages)")


if __name__ == "__main__":
    main(sys.argv)
