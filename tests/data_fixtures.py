"""Fixture builders for the data and metric tests: small files in every original local layout (GLUE
TSVs, CoNLL-2003 column files, SQuAD JSON), a tiny offline WordPiece tokenizer, and the real assets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Rows are written verbatim: quote characters must survive (GLUE is read with csv.QUOTE_NONE).
GLUE_FILES: dict[str, dict[str, str]] = {
    "CoLA": {
        "train.tsv": (
            "gj04\t1\t\tOur friends won't buy this analysis.\n"
            "gj04\t0\t*\tHe said \"go home .\n"
            "clc95\t1\t\tThe \"quoted\" word stays.\n"
        ),
        "dev.tsv": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n",
    },
    "SST-2": {
        "train.tsv": "sentence\tlabel\nhide new secretions \t0\n\" a movie \" that 's \"great\t1\n",
        "dev.tsv": "sentence\tlabel\nit 's a charming journey . \t1\n",
        "test-labeled.tsv": "sentence\tlabel\nuneasy mishmash .\t0\nan \"ok\" film\t1\n",
    },
    "MRPC": {
        # The official files start with a byte-order mark.
        "train.tsv": (
            "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            "1\t702876\t702977\tAmrozi called him \"the witness\".\tHe called him \"the witness\n"
            "0\t2108705\t2108831\tYucaipa owned it.\tYucaipa sold it.\n"
        ),
        "dev.tsv": (
            "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            "1\t1355540\t1355592\tHe said the pie.\t\"The pie.\n"
        ),
    },
    "STS-B": {
        "train.tsv": (
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
            "An air plane is taking off.\t5.000\n"
            "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays a \"flute\".\t"
            "A man plays a flute.\t3.800\n"
        ),
        "dev.tsv": (
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man dances.\tA man sings.\t0.500\n"
        ),
    },
    "QQP": {
        "train.tsv": (
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
            "133273\t213221\t213222\tHow is \"life\"?\tWhat is life like?\t1\n"
            "402555\t536040\t536041\tWhy?\tHow?\t0\n"
        ),
        "dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tA?\tB?\t0\n",
    },
    "MNLI": {
        "train.tsv": (
            "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
            "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
            "0\t31193\t31193n\tgovernment\t( a )\t( b )\t(ROOT a)\t(ROOT b)\t"
            "Conceptually \"cream\" skimming.\tProduct and geography.\tneutral\tneutral\n"
            "1\t101457\t101457e\ttelephone\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tyou know.\tYou know.\t"
            "entailment\tentailment\n"
        ),
        "dev_matched.tsv": (
            "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
            "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\t"
            "label5\tgold_label\n"
            "0\t63735\t63735n\tslate\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tThe new rights.\t"
            "Everyone loves them.\tneutral\tentailment\tneutral\tneutral\tneutral\tneutral\n"
        ),
        "dev_mismatched.tsv": (
            "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
            "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\t"
            "label5\tgold_label\n"
            "0\t75290\t75290c\tletters\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tYour gift.\tNo gift.\t"
            "contradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n"
        ),
    },
    "QNLI": {
        "train.tsv": (
            "index\tquestion\tsentence\tlabel\n"
            "0\tWhen did it start?\tIt started in \"1990\".\tentailment\n"
            "1\tWho?\tNobody knows.\tnot_entailment\n"
        ),
        "dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWhat?\tThat.\tnot_entailment\n",
    },
    "RTE": {
        "train.tsv": (
            "index\tsentence1\tsentence2\tlabel\n"
            "0\tNo Weapons Found in \"Iraq\" Yet.\tWeapons Found in Iraq.\tnot_entailment\n"
            "1\tA place of sorrow.\tPope died.\tentailment\n"
        ),
        "dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tDana died.\tDana is dead.\tentailment\n",
    },
    "WNLI": {
        "train.tsv": (
            "index\tsentence1\tsentence2\tlabel\n"
            "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1\n"
            "1\tJohn couldn't see.\tJohn was short.\t0\n"
        ),
        "dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged.\tThe hair is clogged.\t0\n",
    },
}

GLUE_TASK_DIRS = {
    "cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
    "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI",
}

# DOCSTART at the start, in the middle (closing a document, no blank line after it) and at the end.
CONLL_TRAIN = """-DOCSTART- -X- O O

EU NNP I-NP I-ORG
rejects VBZ I-VP O
German JJ I-NP I-MISC
call NN I-NP O
. . O O

Peter NNP I-NP I-PER
Blackburn NNP I-NP I-PER
Jan NNP I-NP B-PER
Smith NNP I-NP I-PER
and CC O O

-DOCSTART- -X- O O
BRUSSELS NNP I-NP I-LOC
1996-08-22 CD I-NP O

-DOCSTART- -X- O O
"""

CONLL_TESTA = "CRICKET NNP I-NP O\nLEICESTERSHIRE NNP I-NP I-ORG\nWIN NNP I-NP O\n\n-DOCSTART- -X- O O\n"
CONLL_TESTB = "SOCCER NN I-NP O\nJAPAN NNP I-NP I-LOC\n"

SQUAD_CONTEXT = "The Normans were the people who gave their name to Normandy in France."
SQUAD = {
    "version": "1.1",
    "data": [{
        "title": "Normans",
        "paragraphs": [{
            "context": SQUAD_CONTEXT,
            "qas": [
                {"id": "q1", "question": "Who gave their name to Normandy?",
                 "answers": [{"text": "The Normans", "answer_start": 0},
                             {"text": "Normans", "answer_start": 4}]},
                {"id": "q2", "question": " Where is Normandy?",
                 "answers": [{"text": "France", "answer_start": SQUAD_CONTEXT.index("France")}]},
            ],
        }],
    }],
}

TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "the", "cat", "sat", "on", "mat", "wash", "##ing", "##ton", "un", "##aff", "##able", "eu",
    ".", ",", "a", "is", "where", "it", "?", "who", "normans", "normandy", "france", "in",
]


def write_glue(root: Path, folder: str, files: dict[str, str] | None = None) -> Path:
    """Write one GLUE task folder under root/glue/<folder> and return it."""
    path = root / "glue" / folder
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (GLUE_FILES[folder] if files is None else files).items():
        (path / name).write_text(text, encoding="utf-8")
    return path


def write_conll(root: Path) -> Path:
    path = root / "conll2003"
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (("eng.train", CONLL_TRAIN), ("eng.testa", CONLL_TESTA), ("eng.testb", CONLL_TESTB)):
        (path / name).write_text(text, encoding="utf-8")
    return path


def write_squad(root: Path, data: dict | None = None) -> Path:
    path = root / "squad"
    path.mkdir(parents=True, exist_ok=True)
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        (path / name).write_text(json.dumps(SQUAD if data is None else data), encoding="utf-8")
    return path


def tiny_tokenizer(root: Path):
    """A fast uncased WordPiece BERT tokenizer from a vocab file written into `root` (offline)."""
    from transformers import AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    (root / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}), encoding="utf-8"
    )
    return AutoTokenizer.from_pretrained(str(root))


def real_assets() -> Path:
    """$MPQ_ASSETS, else ../shared/assets beside the repository; skips the test when absent."""
    env = os.environ.get("MPQ_ASSETS")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "assets"
    if not path.is_dir():
        pytest.skip("offline assets not found (set MPQ_ASSETS or place ../shared/assets)")
    return path


def real_tokenizer(assets: Path):
    model = assets / "models" / "all-MiniLM-L6-v2"
    if not model.is_dir():
        pytest.skip(f"{model} not found")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))
