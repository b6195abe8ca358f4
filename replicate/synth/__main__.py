"""Command line: ``python -m replicate.synth <competition> --out DIR ...`` writes a synthetic dataset."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

from replicate.synth import aicup, dacon, dcase, maic


class Subcommand(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]


def _add_dacon_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the dataset into")
    parser.add_argument("--n-train", type=int, required=True, help="number of training clips")
    parser.add_argument("--n-test", type=int, required=True, help="number of test clips")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--max-words", type=int, default=3, help="most words in one clip (default 3)")
    parser.add_argument("--voices-per-word", type=int, default=6, help="voice settings per word and split (default 6)")
    parser.add_argument(
        "--seen-test-voices", action="store_true", help="test clips reuse the training voices (default: unseen voices)"
    )


def _run_dacon(arguments: argparse.Namespace) -> dict:
    return dacon.generate(
        arguments.out,
        arguments.n_train,
        arguments.n_test,
        arguments.seed,
        max_words=arguments.max_words,
        voices_per_word=arguments.voices_per_word,
        unseen_test_voices=not arguments.seen_test_voices,
    )


def _add_maic_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the dataset into")
    parser.add_argument("--n-train", type=int, required=True, help="number of training persons")
    parser.add_argument("--n-test", type=int, required=True, help="number of test persons")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--single-json", action="store_true", help="metadata and annotation in one <id>.json (default: two files)"
    )


def _run_maic(arguments: argparse.Namespace) -> dict:
    return maic.generate(
        arguments.out, arguments.n_train, arguments.n_test, arguments.seed, single_json=arguments.single_json
    )


def _add_aicup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the dataset into")
    parser.add_argument("--n-train", type=int, required=True, help="persons of the training list")
    parser.add_argument("--n-public", type=int, default=0, help="persons of the public test list (default 0: none)")
    parser.add_argument("--n-private", type=int, default=0, help="persons of the private test list (default 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _run_aicup(arguments: argparse.Namespace) -> dict:
    return aicup.generate(arguments.out, arguments.n_train, arguments.n_public, arguments.n_private, arguments.seed)


def _add_dcase_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write dev_data/ and eval_data/ into")
    parser.add_argument(
        "--machine-types", default=",".join(dcase.MACHINE_TYPES), help="comma-separated types (default: all six)"
    )
    parser.add_argument("--dev-ids", type=int, help="development IDs per type (default: all, 41 IDs in all)")
    parser.add_argument("--eval-ids", type=int, help="evaluation IDs per type (default: all; 0: no eval_data)")
    parser.add_argument("--train-per-id", type=int, default=100, help="normal training clips per ID (default 100)")
    parser.add_argument(
        "--test-per-id", type=int, default=20, help="normal and anomalous test clips per ID (default 20)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length in seconds (default 10, as real)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _run_dcase(arguments: argparse.Namespace) -> dict:
    return dcase.generate(
        arguments.out,
        machine_types=[name.strip() for name in arguments.machine_types.split(",") if name.strip()],
        dev_ids=arguments.dev_ids,
        eval_ids=arguments.eval_ids,
        train_per_id=arguments.train_per_id,
        test_per_id=arguments.test_per_id,
        seconds=arguments.seconds,
        seed=arguments.seed,
    )


# One entry per competition; each becomes a subcommand.
SUBCOMMANDS: dict[str, Subcommand] = {
    "dacon": Subcommand(
        "DACON overlapping speech: 1 s clips of overlapping spoken words", _add_dacon_arguments, _run_dacon
    ),
    "maic": Subcommand(
        "MAIC 2021 voice pathology: per-person 128-band mel CSVs of 17 tokens, metadata and annotation JSON",
        _add_maic_arguments,
        _run_maic,
    ),
    "aicup": Subcommand(
        "AI CUP 2023 pathological voice: sustained vowels at 44.1 kHz and 26 clinical fields per person",
        _add_aicup_arguments,
        _run_aicup,
    ),
    "dcase": Subcommand(
        "DCASE 2020 Task 2: normal and anomalous machine sounds in dev_data/ and eval_data/",
        _add_dcase_arguments,
        _run_dcase,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replicate.synth", description=__doc__)
    subparsers = parser.add_subparsers(dest="competition", required=True)
    for name, subcommand in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=subcommand.help, description=subcommand.help)
        subcommand.add_arguments(subparser)
    arguments = parser.parse_args(argv)
    try:
        summary = SUBCOMMANDS[arguments.competition].run(arguments)
    except ValueError as error:
        parser.error(str(error))
    unit = summary.get("unit", "clips")
    print(f"wrote {summary['n_train']} train and {summary['n_test']} test {unit} to {summary['out_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
