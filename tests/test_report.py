"""kollama.eval.report: the Markdown table and the charts from two fake runs."""
import json
import sys

import pytest

from kollama.eval import report as R


def _fake_runs(tmp_path):
    a = tmp_path / "lora-kullm"
    a.mkdir()
    (a / "config.json").write_text(json.dumps({"method": "lora", "data": ["/data/kullm-v2.jsonl"],
                                               "tokenizer_path": "/tok/tokenizer.model",
                                               "trainable_params": 4194304}))
    (a / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 900.0},
        {"step": 20, "loss": 2.1, "lr": 1e-4, "tokens_per_s": 910.0},
        {"step": 20, "dev_loss": 2.3},
        {"step": 30, "loss": 1.9, "lr": 5e-5, "tokens_per_s": 905.0, "train_tokens": 123456,
         "train_wall_time_s": 61.5}]) + "\n{torn")
    (a / "results.json").write_text(json.dumps({"meta": {"wall_time_s": 12.0, "tokenizer_path": "x"}, "tasks": {
        "kobest_copa": {"acc": 0.61, "acc_norm": 0.6, "macro_f1": 0.605, "n": 500, "k_shot": 0},
        "bpc": {"ud_ko_gsd_dev": {"bits_per_char": 1.25, "bits_per_byte": 0.5, "token_ppl": 9.0, "docs": 950}},
        "en2ko": {"park_dev": {"chrf++": 20.5, "bleu": 3.1, "bleu_signature": "nrefs:1|..."}}}}))
    b = tmp_path / "base"
    b.mkdir()
    (b / "results.json").write_text(json.dumps({"tasks": {
        "kobest_copa": {"acc": 0.55, "acc_norm": 0.52, "macro_f1": 0.54},
        "bpc": {"ud_ko_gsd_dev": {"bits_per_char": 1.6, "bits_per_byte": 0.64, "token_ppl": 14.0}}}}))
    return a, b


def test_report_markdown_and_charts(tmp_path, capsys):
    a, b = _fake_runs(tmp_path)
    out = tmp_path / "report"
    path = R.report(str(a), str(b), out_dir=str(out))
    md = path.read_text(encoding="utf-8")
    table = [l for l in md.splitlines() if l.startswith("|")]
    assert table[0] == "| | lora-kullm | base |"
    rows = {l.split(" | ")[0].lstrip("| "): l for l in table}
    assert rows["method"] == "| method | lora | – |"
    assert rows["data"] == "| data | kullm-v2.jsonl | – |"
    assert rows["trainable params"] == "| trainable params | 4,194,304 | – |"
    assert rows["train tokens"] == "| train tokens | 123,456 | – |"
    assert rows["train wall time (s)"] == "| train wall time (s) | 61.5 | – |"
    assert rows["kobest_copa acc ↑"] == "| kobest_copa acc ↑ | 0.6100 | 0.5500 |"
    assert rows["bpc/ud_ko_gsd_dev bits_per_char ↓"] == "| bpc/ud_ko_gsd_dev bits_per_char ↓ | 1.2500 | 1.6000 |"
    assert rows["en2ko/park_dev chrf++ ↑"] == "| en2ko/park_dev chrf++ ↑ | 20.5000 | – |"
    assert not any("n ↑" in l or "signature" in l for l in table)  # counts and strings stay out
    assert "metrics.jsonl:5: not valid JSON" in md  # the torn line is reported, the curve kept
    run = R.load_run(a)
    assert run["loss"] == [(10, 2.5), (20, 2.1), (30, 1.9)] and run["dev_loss"] == [(20, 2.3)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in md
        return
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "loss.png" in pngs and "metric_kobest_copa_acc.png" in pngs and "metric_en2ko_park_dev_chrfpp.png" in pngs
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training loss](loss.png)" in md
    assert not list(out.glob(".*tmp*"))


def test_report_without_matplotlib(tmp_path, monkeypatch):
    a, b = _fake_runs(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    path = R.report(str(a), str(b), out_dir=str(tmp_path / "r"), names="A,B")
    md = path.read_text(encoding="utf-8")
    assert "| | A | B |" in md and "matplotlib is not installed" in md
    assert not list((tmp_path / "r").glob("*.png"))


def test_report_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        R.main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(R.ReportError, match="--names has 1 entries for 2 runs"):
        R.report(str(tmp_path), str(tmp_path), names="x")
    (tmp_path / "results.json").write_text(json.dumps({"tasks": {"nsmc": {"acc": 0.8}}}))
    path = R.report(str(tmp_path / "results.json"), out_dir=str(tmp_path / "o"))
    assert "| nsmc acc ↑ | 0.8000 |" in path.read_text(encoding="utf-8")


def test_method_label_and_wall_time_format(tmp_path):
    from kollama.eval.report import load_run, markdown_table

    run = tmp_path / "vocab"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "lora", "trainable": "lora+embeddings", "task": "pretrain",
                                                 "train_wall_time_s": 33.3}))
    table = markdown_table([load_run(run)])
    assert "| method | lora (lora+embeddings), pretrain |" in table
    assert "| train wall time (s) | 33.3 |" in table
