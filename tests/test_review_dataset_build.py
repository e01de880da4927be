"""dataset_tools build: input files found by reviews (legacy encodings, globs matching folders)."""

import pytest

from dataset_tools import build, metadata


def _titles(result):
    return {row["video_id"]: row["title"] for row in result.rows}


def test_windows_1252_csv_keeps_its_punctuation(tmp_path, capsys):
    # Excel on Windows saves "CSV" in cp1252. Read as latin-1, its curly quotes, dashes, euro
    # sign and ellipsis became C1 control characters in the captions ("Don\x92t"), and the
    # ellipsis (0x85, NEL) was taken for whitespace and vanished.
    path = tmp_path / "export.csv"
    text = "video_id,title\nokokokokok1,Don’t stop – “live” … 5€ Café\n"
    path.write_bytes(text.encode("cp1252"))
    rows = _titles(metadata.read_metadata([str(path)]))
    assert rows["okokokokok1"] == "Don’t stop – “live” … 5€ Café"
    assert "reading as Windows-1252" in capsys.readouterr().out
    # Bytes Windows-1252 leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D): latin-1 as before (the
    # C1 control character it gives becomes a space in the caption, as every control character).
    odd = tmp_path / "odd.csv"
    odd.write_bytes(b"video_id,title\nokokokokok1,caf\xe9 \x81\n")
    assert _titles(metadata.read_metadata([str(odd)]))["okokokokok1"] == "café"
    assert "reading as latin-1" in capsys.readouterr().out


def test_utf16_csv_is_read(tmp_path):
    # PowerShell 5 (`> file.csv`, Out-File) and "Unicode" exports write UTF-16 with a byte order
    # mark: the build stopped on "no video id column ... found ['ÿþv', ...]".
    text = "video_id,title\nokokokokok1,Привет\nokokokokok2,x\n"
    for name, encoding in (("le.csv", "utf-16-le"), ("be.tsv", "utf-16-be")):
        path = tmp_path / name
        data = text if name.endswith(".csv") else text.replace(",", "\t")
        bom = "\ufeff".encode(encoding)
        path.write_bytes(bom + data.encode(encoding))
        assert _titles(metadata.read_metadata([str(path)])) == {"okokokokok1": "Привет", "okokokokok2": "x"}


def test_utf16_csv_rejected_row_names_its_line(tmp_path):
    path = tmp_path / "le.csv"
    text = "video_id,title\nokokokokok1,a\nbad-id,b\n"
    path.write_bytes(text.encode("utf-16"))
    result = metadata.read_metadata([str(path)])
    assert [r["source"] for r in result.rejected] == [f"{path}:3"]
    path.write_bytes((text + "okokokokok2,c,one field too many\n").encode("utf-16"))  # the csv-module path
    result = metadata.read_metadata([str(path)])
    assert [r["source"] for r in result.rejected] == [f"{path}:3", f"{path}:4"]
    assert list(_titles(result)) == ["okokokokok1"]


def test_glob_matching_a_folder_reads_it_like_a_folder(tmp_path):
    # A quoted glob (`--input 'data/*'`) that matched a folder stopped the build with an
    # IsADirectoryError traceback; the shell's own expansion passes that folder, read as a folder.
    data = tmp_path / "data"
    (data / "GB").mkdir(parents=True)
    (data / "US.csv").write_text("video_id,title\nokokokokok1,a\n")
    (data / "GB" / "GB.csv").write_text("video_id,title\nokokokokok2,b\n")
    result = metadata.read_metadata([str(data / "*")])
    assert sorted(_titles(result)) == ["okokokokok1", "okokokokok2"]


def test_glob_matching_the_output_folder_is_refused(tmp_path):
    # `--input 'data/*' --output data/shards`: the resume read the shards' parquet and stats back
    # as metadata. Refused before anything is written, like a folder named as both.
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    (data / "US.csv").write_text("video_id,title\nokokokokok1,a\n")
    cfg = build.BuildConfig(inputs=[str(data / "*")], output=str(data / "shards"))
    with pytest.raises(SystemExit, match=r"matches the --output folder"):
        build.check_config(cfg)
    (data / "shards").rmdir()  # the first build too, before it creates the folder
    with pytest.raises(SystemExit, match=r"matches the --output folder"):
        build.check_config(cfg)
    build.check_config(build.BuildConfig(inputs=[str(data / "*.csv")], output=str(data / "shards")))
    build.check_config(build.BuildConfig(inputs=[str(data / "*")], output=str(data / "x" / "shards")))


def test_a_file_named_twice_is_read_once(tmp_path):
    # `--input data/ data/US.csv`: every row was counted twice in input_rows and reported as a
    # "duplicate row collapsed"; the shards were right, the accounting was not.
    data = tmp_path / "data"
    data.mkdir()
    (data / "US.csv").write_text("video_id,title\ndQw4w9WgXcQ,x\n9bZkp7q19f0,y\n")
    result = metadata.read_metadata([str(data), str(data / "US.csv"), str(data / "*.csv")])
    assert (result.input_rows, result.duplicates, len(result.rows)) == (2, 0, 2)
