"""The cases of benchmarks/qa_eval.py: real text a fresh machine can get offline, and questions
written by reading it.

  prose      short facts planted at spread depths in natural prose (the essays and the
             company history of examples/, then the King James Bible from Debian's
             bible-kjv packages): four sets of eight, each set in its own document at each
             length;
  technical  the Bash reference manual as Debian's bash-doc installs it (bash.pdf, 82k tokens),
             questions answered by one sentence of it;
  multi      questions whose answer needs two passages of examples/lantern_bay.md;
  folder     questions over the example library (examples/library.py: 11 documents), `ask DIR`.

Questions alternate between a tuning half and a held-out half. Debian packages are fetched
with `apt-get download` and unpacked with `dpkg-deb -x` into the data folder (nothing is
installed); the same files then serve every later run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from retrieval_eval import NEEDLES, haystack_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@dataclass(frozen=True)
class Question:
    text: str
    keys: tuple[str, ...]  # every one must be in the answer
    half: str  # "tune" or "held"
    evidence: tuple[str, ...] = ()  # where the answer is (default: the keys), for the short version


@dataclass
class Case:
    suite: str
    name: str
    path: Path  # a document, or a folder (suite "folder")
    questions: list[Question]
    tokens: int = 0  # document length asked for (prose)
    short: Path | None = None  # prose: the same facts in the short document full attention reads


def halves(items: list[tuple]) -> list[Question]:
    """(text, keys[, evidence]) -> Questions, alternately tuning and held out."""
    return [Question(t[0], tuple(t[1]), "tune" if i % 2 == 0 else "held", tuple(t[2]) if len(t) > 2 else ())
            for i, t in enumerate(items)]


# ---- prose: planted facts ---------------------------------------------------------------
# Four sets of eight (sentence planted, question, answer). Each set is planted in its own copy of
# the haystack, eight facts to a document as in the needle test, so that a length has 32
# questions (16 a half) without crowding a document with facts.
FACT_SETS = [
    NEEDLES + [  # the needle test's four, and four more
        ("Dr. Halvorsen's favourite chess opening is the Catalan.",
         "What is Dr. Halvorsen's favourite chess opening?", "catalan"),
        ("The old mill by the river was painted bright yellow in 1962.",
         "What colour was the old mill by the river painted in 1962?", "yellow"),
        ("The password for the back room of the Elm Street library is juniper.",
         "What is the password for the back room of the Elm Street library?", "juniper"),
        ("Captain Ines Morrow named her sailing boat the Wren.", "What did Captain Ines Morrow name her sailing boat?",
         "wren"),
    ],
    [
        ("Mrs. Abernathy keeps her pet tortoise in a copper bathtub.",
         "Where does Mrs. Abernathy keep her pet tortoise?", "bathtub"),
        ("The winning ticket in the Oakridge raffle was number 7382.",
         "What was the number of the winning ticket in the Oakridge raffle?", "7382"),
        ("The painter Lucia Varga's favourite flower is the foxglove.",
         "What is the painter Lucia Varga's favourite flower?", "foxglove"),
        ("Uncle Bertram's prize-winning pumpkin weighed 412 pounds.",
         "How much did Uncle Bertram's prize-winning pumpkin weigh?", "412"),
        ("The mayor of Little Dunmore rides to work on a donkey called Pepper.",
         "What is the name of the donkey the mayor of Little Dunmore rides to work?", "pepper"),
        ("Sister Agatha hid the convent's silver under the chapel organ.",
         "Where did Sister Agatha hide the convent's silver?", "organ"),
        ("The night train to Port Selwyn leaves from platform 14.",
         "From which platform does the night train to Port Selwyn leave?", "14"),
        ("The astronomer Felix Brandt named the comet he discovered Ondine.",
         "What did the astronomer Felix Brandt name the comet he discovered?", "ondine"),
    ],
    [
        ("The secret word for the Riverside chess club is pelican.",
         "What is the secret word for the Riverside chess club?", "pelican"),
        ("Grandfather Osei's pocket watch was made in Geneva in 1911.",
         "In which city was Grandfather Osei's pocket watch made?", "geneva"),
        ("The lost treasure of Captain Fairlie was buried beneath a fig tree.",
         "Beneath what was the lost treasure of Captain Fairlie buried?", "fig"),
        ("The combination of Mr. Voss's safe is 2958.", "What is the combination of Mr. Voss's safe?",
         "2958"),
        ("Nurse Pemberton's parrot can only say the word marmalade.",
         "What is the only word Nurse Pemberton's parrot can say?", "marmalade"),
        ("The Garrick family's caravan is painted sea green with orange wheels.",
         "What colour are the wheels of the Garrick family's caravan?", "orange"),
        ("The poet Amara Quist wrote all her poems in an old windmill.",
         "Where did the poet Amara Quist write all her poems?", "windmill"),
        ("The ferryman of Loch Arrin is paid one turnip for each crossing.",
         "What is the ferryman of Loch Arrin paid for each crossing?", "turnip"),
    ],
    [
        ("The guard dog at the Corrin Hill quarry is a mastiff named Thunder.",
         "What is the name of the guard dog at the Corrin Hill quarry?", "thunder"),
        ("Granny Loveday's famous jam is made from rhubarb and ginger.",
         "What is Granny Loveday's famous jam made from besides ginger?", "rhubarb"),
        ("The clock tower in Talbot Square stopped at 6:42 on the night of the storm.",
         "At what time did the clock tower in Talbot Square stop on the night of the storm?", "6:42"),
        ("Detective Marlowe Pike solved the Ellsworth case with a torn bus ticket.",
         "What helped Detective Marlowe Pike solve the Ellsworth case?", "ticket"),
        ("The first telephone in the town of Brackwater was installed in the barber's shop.",
         "Where was the first telephone in the town of Brackwater installed?", "barber"),
        ("Professor Lindgren's favourite instrument is the bassoon.",
         "What is Professor Lindgren's favourite instrument?", "bassoon"),
        ("The stolen painting from the Aldridge gallery was found in a laundry basket.",
         "Where was the stolen painting from the Aldridge gallery found?", "laundry"),
        ("The rowing club of Saint Brennan's college paints its boats purple.",
         "What colour does the rowing club of Saint Brennan's college paint its boats?", "purple"),
    ],
]
FACTS = [fact for facts in FACT_SETS for fact in facts]
DEPTHS = (0.08, 0.2, 0.32, 0.44, 0.56, 0.68, 0.8, 0.92)  # of a set, in order: both halves span the document
SHORT_PROSE = 4096  # tokens of the prose suite's short version (full attention's ceiling)


def debian_package(name: str, data: Path) -> Path:
    """The files of Debian package `name`, unpacked under data/debian/name (downloaded once)."""
    root = data / "debian" / name
    if not (root / ".unpacked").exists():
        print(f"fetching Debian package {name} (apt-get download)", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", name], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob(f"{name}_*.deb"))
            root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (root / ".unpacked").touch()
    return root


def bible_text(data: Path) -> str:
    """The King James Bible as plain paragraphs, one per chapter under its heading."""
    out = data / "kjv.txt"
    if not out.exists():
        program = debian_package("bible-kjv", data) / "usr/bin/bible"
        texts = debian_package("bible-kjv-text", data) / "usr/lib"
        raw = subprocess.run([str(program), "-p", str(texts), "Gen1:1-Rev22:21"], check=True, capture_output=True,
                             text=True).stdout
        chapters: list[tuple[str, list[str]]] = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            if not line[0].isspace():  # "Genesis 1"
                chapters.append((line.strip(), []))
            elif m := re.match(r"\s+\d+ (.*)", line):  # "  2 And the earth ..."
                chapters[-1][1].append(m.group(1))
            else:  # a verse's continuation line
                chapters[-1][1][-1] += " " + line.strip()
        out.write_text("\n\n".join(f"{head}\n\n{' '.join(verses)}" for head, verses in chapters))
    return out.read_text()


def prose_haystack(data: Path) -> str:
    """The needle test's haystack (the examples' essays and company history), then the Bible."""
    return haystack_text() + "\n\n" + bible_text(data)


def plant_all(tokenizer, text: str, n_tokens: int, facts: list[tuple[str, str, str]]) -> str:
    """The first ~n_tokens of text with each fact at a paragraph break near its depth."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) < n_tokens:
        raise SystemExit(f"the prose haystack has only {len(enc['input_ids'])} tokens")
    body = text[:enc["offset_mapping"][n_tokens - 1][1]]
    cuts = [body.rfind("\n\n", 0, int(len(body) * d)) + 2 for d in DEPTHS]
    pieces, prev = [], 0
    for (fact, _, _), cut in zip(facts, cuts, strict=True):
        pieces += [body[prev:cut], fact + "\n\n"]
        prev = cut
    return "".join(pieces) + body[prev:]


def prose_document(tokenizer, data: Path, n_tokens: int, facts_set: int) -> Path:
    """The haystack's first n_tokens with FACT_SETS[facts_set] planted (written once)."""
    path = data / f"prose_{n_tokens // 1024}k{'' if facts_set == 0 else f'_{facts_set}'}.txt"
    if not path.exists():
        path.write_text(plant_all(tokenizer, prose_haystack(data), n_tokens, FACT_SETS[facts_set]))
    return path


def prose_cases(tokenizer, data: Path, lengths: list[int], sets: int = len(FACT_SETS)) -> list[Case]:
    """One case per length and fact set; a length's sets share the case name (one row of the table)."""
    return [Case("prose", f"prose {n // 1024}k", prose_document(tokenizer, data, n, i),
                 halves([(q, [a]) for _, q, a in FACT_SETS[i]]), tokens=n,
                 short=prose_document(tokenizer, data, SHORT_PROSE, i))
            for n in lengths for i in range(sets)]


# ---- technical: the Bash manual ---------------------------------------------------------
BASH_QUESTIONS = [  # (question, answer keys, evidence)
    ("How often, in seconds, does bash check for mail by default?", ["60"], ["The default is 60 seconds"]),
    ("What is the largest number the RANDOM variable can expand to?", ["32767"], ["between 0 and 32767"]),
    ("To what value does the shell set HISTSIZE by default?", ["500"], ["The shell sets the default value to 500"]),
    ("Which variable sets the default timeout for the read builtin?", ["tmout"],
     ["treated as the default timeout for the read builtin"]),
    ("Which array variable records the parts of a string matched by the =~ operator?", ["bash_rematch"],
     ["The array variable BASH_REMATCH records"]),
    ("Which reserved word starts a coprocess?", ["coproc"], ["preceded by the coproc reserved word"]),
    ("Which variable expands to the number of seconds since the Unix Epoch?", ["epochseconds"],
     ["it expands to the number of seconds since the Unix Epoch"]),
    ("Which variable sets a maximum function nesting level?", ["funcnest"], ["a maximum function nesting level"]),
    ("In which file is the command history saved by default?", ["bash_history"],
     ["named by the variable HISTFILE (default"]),
    ("Which shell option makes the pattern ** match all files and zero or more directories?", ["globstar"],
     ["globstar If set, the pattern"]),
    ("Which shell option runs a command name that is the name of a directory as if it were the argument to cd?",
     ["autocd"], ["autocd If set"]),
    ("Which shell option corrects minor errors in the spelling of a directory name given to cd?", ["cdspell"],
     ["cdspell If set"]),
    ("What exit status does bash return when a command is not found?", ["127"], ["returns a status of 127"]),
    ("Which variable holds the search path for the cd command?", ["cdpath"], ["The search path for the cd command"]),
    ("Which variable sets the maximum number of lines contained in the history file?", ["histfilesize"],
     ["The maximum number of lines contained in the history"]),
]


def technical_cases(data: Path) -> list[Case]:
    pdf = debian_package("bash-doc", data) / "usr/share/doc/bash/bash.pdf"
    return [Case("technical", "bash manual (PDF)", pdf, halves(BASH_QUESTIONS))]


# ---- two passages, and a folder -----------------------------------------------------------
TWO_PASSAGE_QUESTIONS = [
    ("Who was the first master of the Marigold, and who became the company's first female deckhand?",
     ["broadbent", "birkett"]),
    ("What was the company's first diesel motor vessel called, and who was her captain when she sank in 1942?",
     ["snowdrop", "fairweather"]),
    ("In what year was the Lantern Bay Ferry Company founded, and in what year did the Great Fire destroy its "
     "premises on Quay Street?", ["1871", "1886"], ["founded", "Great Fire"]),
    ("With which two companies did the Lantern Bay Ferry Company merge, in 1907 and in 1968?",
     ["greywick steam packet", "skerrow"], ["merged with the Greywick Steam Packet", "1968"]),
    ("Which junior clerk saved the main ledger from the fire, and who designed the company's lantern emblem in "
     "1929?", ["crane", "ashby"], ["saved the", "Ashby"]),
    ("Who became managing director in 1922, and who became the company's first woman chairman in 1961?",
     ["marchbank", "mowbray"]),
    ("What was the only hydrofoil the company ever owned, and what was the fast catamaran that entered service "
     "on the Skerrow route in 1987?", ["meadowsweet", "campion"]),
    ("Which steamer was wrecked off Tallow Point in 1903, and what was the company's first steel-hulled "
     "steamer?", ["columbine", "bluebell"], ["wrecked the steamer Columbine", "Bluebell"]),
    ("Who led the management buyout of 1984, and which company bought the Lantern Bay Ferry Company in 1998?",
     ["oakhurst", "northshore"]),
    ("Who was the union organiser during the 1921 strike, and who was the first woman to command a vessel for "
     "the company?", ["kettering", "carne"]),
]

FOLDER_QUESTIONS = [
    ("When was the Apache License, Version 2.0 published?", ["2004"], ["January 2004"]),
    ("Who was the union organiser for the Lantern Bay district during the 1921 strike?", ["kettering"]),
    ("What is the date of version 3 of the GNU General Public License?", ["2007"], ["29 June 2007"]),
    ("In what year was the Halloran Narrows Bridge opened?", ["1958"], ["Halloran Narrows Bridge"]),
    ("When was version 2.1 of the GNU Lesser General Public License published?", ["1999"], ["February 1999"]),
    ("Who designed the Lantern Bay Ferry Company's lantern emblem in 1929?", ["ashby"]),
    ("Who is the license steward of the Mozilla Public License 2.0?", ["mozilla foundation"],
     ["is the license steward"]),
    ("What was the name of the only hydrofoil the Lantern Bay Ferry Company ever owned?", ["meadowsweet"]),
]


def multi_cases(data: Path) -> list[Case]:
    sys.path.insert(0, str(EXAMPLES))
    from library import build  # examples/library.py

    return [Case("multi", "two passages (lantern_bay.md)", EXAMPLES / "lantern_bay.md", halves(TWO_PASSAGE_QUESTIONS)),
            Case("folder", "folder of 11 documents", build(data / "library"), halves(FOLDER_QUESTIONS))]
