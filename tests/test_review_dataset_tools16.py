"""`dataset_tools build --input` given twice: both files are read (the second flag replaced the first)."""

from __future__ import annotations

from dataset_tools.cli import build_parser


def test_input_given_twice_reads_both_files():
    args = build_parser().parse_args(
        ["build", "--input", "a.csv", "--input", "b.csv", "c.csv", "--output", "o"]
    )
    assert args.input == ["a.csv", "b.csv", "c.csv"]


def test_input_given_once_with_several_files_is_unchanged():
    args = build_parser().parse_args(["build", "--input", "a.csv", "b.csv", "--output", "o"])
    assert args.input == ["a.csv", "b.csv"]
