"""Chunking, ingestion into the real Postgres with pgvector, search and passage injection."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.embeddings import get_embedder
from pipeline.retrieval import Chunk, Passage, chunk_text, ingest_paths, inject_passages, search

KNOWLEDGE_DIR = Path(__file__).resolve().parent.parent / "docs" / "examples" / "knowledge"


# ---- chunk_text --------------------------------------------------------------


def test_chunk_markdown_by_headings():
    text = "Intro line.\n\n# Guide\n\nFirst para.\n\nSecond para.\n\n## Setup\n\nPlug it in.\n\n# FAQ\n\nAsk us.\n"
    assert chunk_text(text) == [
        Chunk(None, "Intro line."),
        Chunk("Guide", "First para.\n\nSecond para."),
        Chunk("Guide > Setup", "Plug it in."),
        Chunk("FAQ", "Ask us."),
    ]


def test_chunk_splits_paragraphs_at_max_chars():
    text = "# H\n\n" + "\n\n".join(["a" * 30, "b" * 30, "c" * 30])
    # 30 + 2 + 30 = 62 fits in 70; adding the third paragraph would not.
    assert chunk_text(text, max_chars=70) == [Chunk("H", "a" * 30 + "\n\n" + "b" * 30), Chunk("H", "c" * 30)]


def test_chunk_splits_long_paragraph_at_sentences():
    sentences = ["Sentence number one is here.", "Sentence number two is here.", "Sentence number three."]
    chunks = chunk_text(" ".join(sentences), max_chars=60)
    assert [chunk.content for chunk in chunks] == [sentences[0] + " " + sentences[1], sentences[2]]
    assert all(len(chunk.content) <= 60 for chunk in chunks)


def test_chunk_splits_chinese_sentences():
    text = "第一句话比较长一些。" * 3 + "最后一句。"
    chunks = chunk_text(text, max_chars=25)
    assert [chunk.content for chunk in chunks] == ["第一句话比较长一些。第一句话比较长一些。", "第一句话比较长一些。最后一句。"]


def test_chunk_hard_splits_unbroken_text():
    chunks = chunk_text("x" * 25, max_chars=10)
    assert [chunk.content for chunk in chunks] == ["x" * 10, "x" * 10, "x" * 5]


def test_chunk_ignores_headings_in_code_fences():
    """A "# comment" inside a fenced code block must not start a new section."""
    text = "# Script\n\n```bash\n# install first\npip install x\n```\n"
    assert chunk_text(text) == [Chunk("Script", "```bash\n# install first\npip install x\n```")]


def test_chunk_plain_text_has_no_headings():
    text = "# not a heading\n\nsecond paragraph"
    assert chunk_text(text, is_markdown=False) == [Chunk(None, "# not a heading\n\nsecond paragraph")]


def test_chunk_empty_text():
    assert chunk_text("") == []
    assert chunk_text("# Only a heading\n") == []


def test_chunk_rejects_bad_max_chars():
    with pytest.raises(ValueError, match="max_chars=0 is invalid"):
        chunk_text("text", max_chars=0)


# ---- ingestion and search ------------------------------------------------------


def count_rows(db) -> tuple[int, int]:
    num_documents = db.execute("SELECT count(*) FROM documents").fetchone()[0]
    num_chunks = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    return num_documents, num_chunks


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


@pytest.fixture
def knowledge(db, embedder):
    """The sample knowledge folder, freshly ingested; returns the first ingest's counts."""
    db.execute("DELETE FROM documents WHERE source LIKE %s", (f"{KNOWLEDGE_DIR}/%",))
    return ingest_paths(db, embedder, [KNOWLEDGE_DIR])


def test_ingest_counts(knowledge, db):
    assert knowledge == {"documents": 3, "chunks": 13, "skipped": 0}
    rows = db.execute(
        "SELECT d.source, count(c.id) FROM documents d JOIN chunks c ON c.document_id = d.id "
        "WHERE d.source LIKE %s GROUP BY d.source ORDER BY d.source",
        (f"{KNOWLEDGE_DIR}/%",),
    ).fetchall()
    assert rows == [
        (str(KNOWLEDGE_DIR / "kettle-guide.md"), 6),
        (str(KNOWLEDGE_DIR / "policies.md"), 4),
        (str(KNOWLEDGE_DIR / "warranty-zh.md"), 3),
    ]


def test_reingest_is_noop(knowledge, db, embedder):
    before = count_rows(db)
    assert ingest_paths(db, embedder, [KNOWLEDGE_DIR]) == {"documents": 0, "chunks": 0, "skipped": 3}
    assert count_rows(db) == before


def test_reingest_changed_file_replaces_chunks(db, embedder, tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Old\n\nThe old text.\n\n# Older\n\nMore old text.\n")
    assert ingest_paths(db, embedder, [path]) == {"documents": 1, "chunks": 2, "skipped": 0}

    path.write_text("# New\n\nThe new text.\n")
    assert ingest_paths(db, embedder, [path]) == {"documents": 1, "chunks": 1, "skipped": 0}

    rows = db.execute(
        "SELECT c.chunk_index, c.heading, c.content FROM chunks c JOIN documents d ON d.id = c.document_id "
        "WHERE d.source = %s", (str(path.resolve()),),
    ).fetchall()
    assert rows == [(0, "New", "The new text.")]


def test_ingest_txt_file(db, embedder, tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("# not a heading\n\nsecond paragraph\n")
    assert ingest_paths(db, embedder, [path]) == {"documents": 1, "chunks": 1, "skipped": 0}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("manual.pdf", b"%PDF-1.4", "has an unsupported suffix; supported suffixes: .md, .markdown, .txt"),
        ("latin1.md", "café".encode("latin-1"), "is not UTF-8 text"),
        ("missing.md", None, "is not a readable file or folder"),
        ("empty_dir", "dir", "contains no files with a supported suffix (.md, .markdown, .txt)"),
    ],
)
def test_ingest_bad_path_stores_nothing(db, embedder, tmp_path, name, content, message):
    """A bad path after a good one must raise before the good one is written."""
    good = tmp_path / "good.md"
    good.write_text("# Good\n\nThis file is fine.\n")
    bad = tmp_path / name
    if content == "dir":
        bad.mkdir()
        (bad / "image.png").write_bytes(b"\x89PNG")
    elif content is not None:
        bad.write_bytes(content)
    before = count_rows(db)

    with pytest.raises(ValueError) as info:
        ingest_paths(db, embedder, [good, bad])

    assert message in str(info.value)
    assert str(bad) in str(info.value)
    assert count_rows(db) == before


def test_search_english_question(knowledge, db, embedder):
    passages = search(db, embedder, "How do I descale the kettle?")
    assert len(passages) == 3
    first = passages[0]
    assert Path(first.source).name == "kettle-guide.md"
    assert first.heading == "Aurora Smart Kettle: user guide > Descaling"
    assert "white vinegar" in first.content
    assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)


def test_search_chinese_question(knowledge, db, embedder):
    first = search(db, embedder, "水壶的保修期是多久？", top_k=1)[0]
    assert Path(first.source).name == "warranty-zh.md"
    assert first.heading == "北风电器售后服务说明 > 保修政策"
    assert "两年免费保修" in first.content


def test_search_top_k_and_blank_query(knowledge, db, embedder):
    assert len(search(db, embedder, "refund", top_k=5)) == 5
    assert search(db, embedder, "   ") == []
    with pytest.raises(ValueError, match="top_k=0 is invalid"):
        search(db, embedder, "refund", top_k=0)


# ---- inject_passages -----------------------------------------------------------

PASSAGES = [
    Passage("/srv/kb/kettle-guide.md", 4, "Guide > Descaling", "Use white vinegar once a month.", 0.63),
    Passage("/srv/kb/notes.txt", 0, None, "Plain note.", 0.2),
]


def test_inject_into_existing_system_message():
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "How to descale?"}]

    result = inject_passages(messages, PASSAGES)

    assert result[1] == messages[1]
    system = result[0]["content"]
    assert system.startswith("You are terse.\n\nAnswer the user's question using the numbered passages below.")
    assert "Cite the passages you use as [n]." in system
    assert system.endswith(
        "[1] kettle-guide.md — Guide > Descaling\nUse white vinegar once a month.\n\n[2] notes.txt\nPlain note."
    )
    assert messages[0]["content"] == "You are terse."


def test_inject_creates_system_message():
    messages = [{"role": "user", "content": "How to descale?"}]
    result = inject_passages(messages, PASSAGES[:1])
    assert [message["role"] for message in result] == ["system", "user"]
    assert "[1] kettle-guide.md — Guide > Descaling\nUse white vinegar once a month." in result[0]["content"]
    assert messages == [{"role": "user", "content": "How to descale?"}]


def test_inject_without_passages_returns_copy():
    messages = [{"role": "user", "content": "hi"}]
    result = inject_passages(messages, [])
    assert result == messages
    assert result is not messages


def test_inject_search_results(knowledge, db, embedder):
    passages = search(db, embedder, "What does the error code E2 mean?", top_k=2)
    system = inject_passages([{"role": "user", "content": "E2?"}], passages)[0]["content"]
    assert "[1] kettle-guide.md — Aurora Smart Kettle: user guide > Error codes" in system
    assert "E2: the temperature sensor failed." in system
