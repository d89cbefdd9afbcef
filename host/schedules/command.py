"""``edgetune schedules ls|show|import|export``."""

from __future__ import annotations

import click

from ..cliutil import emit, json_option, table

store_option = click.option(
    "--schedules", "location", default=None, metavar="PATH|URL",
    help="The schedule store: a SQLite file or a postgresql:// URL (default: $EDGETUNE_SCHEDULES, "
         "else ~/.local/share/edgetune/schedules.sqlite).")


def _open(location: str | None):
    from .store import ScheduleStore

    return ScheduleStore(location)


@click.group()
def schedules() -> None:
    """The schedule store: every schedule measured, by workload and CPU class, shared by sessions.

    \b
    Example:
      edgetune schedules ls
      edgetune schedules import runs/rpi4
      edgetune schedules show llvm/aarch64-linux-gnu/cortex-a72
      edgetune schedules export llvm/aarch64-linux-gnu/cortex-a72 -o best/a72
    """


@schedules.command("ls")
@store_option
@json_option
def ls(location: str | None, as_json: bool) -> None:
    """The CPU classes the store holds schedules for, with counts.

    \b
    Example:
      edgetune schedules ls --schedules postgresql://me@db/edgetune
    """
    from .store import redact

    with _open(location) as store:
        classes = store.classes()
        where = redact(store.location)

    def render(rows) -> str:
        if not rows:
            return f"{where}: empty (`edgetune tune` fills it; `edgetune schedules import DIR` adds old logs)"
        return f"{where}\n\n" + table(
            [[c.cpu_class, c.workloads, c.records, c.measured, c.sources] for c in rows],
            ["CPU CLASS", "WORKLOADS", "RECORDS", "MEASURED", "SOURCES"])

    emit(classes, as_json, render)


@schedules.command()
@click.argument("cpu_class")
@store_option
@json_option
def show(cpu_class: str, location: str | None, as_json: bool) -> None:
    """The best schedule of every workload of one CPU class (as `schedules ls` names it).

    \b
    Example:
      edgetune schedules show llvm/aarch64-linux-gnu/cortex-a72 --json
    """
    from ..errors import EdgetuneError

    with _open(location) as store:
        best = store.best_by_workload(cpu_class)
        known = [c.cpu_class for c in store.classes()]
    if not best:
        raise EdgetuneError(f"no schedules for CPU class {cpu_class!r}: pick one of "
                            f"{', '.join(known) or 'none (the store is empty)'}")

    def render(rows) -> str:
        def us(value: float | None) -> str:
            return f"{value:.1f}" if value is not None else "-"

        # Hot: timed with the kernel's data in the caches; cold: after a cache flush, as a kernel whose
        # weights come from memory runs in the model (the two do not compare).
        return table([[w.name or "-", w.shash, w.records, us(w.best_hot_us), us(w.best_cold_us)] for w in rows],
                     ["TASK", "WORKLOAD HASH", "RECORDS", "BEST HOT us", "BEST COLD us"])

    emit(best, as_json, render)


@schedules.command("import")
@click.argument("folders", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@store_option
@json_option
def import_(folders: tuple[str, ...], location: str | None, as_json: bool) -> None:
    """Add the records of tuning logs and stock MetaSchedule work dirs (each FOLDER and the folders under it).

    \b
    Example:
      edgetune schedules import runs/ ~/old-tvm-work-dir
    """
    from ..errors import EdgetuneError
    from ..logs.format import RECORD_FILE, WORKLOAD_FILE
    from .store import iter_log_folders

    results = []
    with _open(location) as store:
        for folder in folders:
            found = list(iter_log_folders(folder))
            if not found:
                raise EdgetuneError(f"{folder} holds no tuning log ({WORKLOAD_FILE} + {RECORD_FILE}): "
                                    "pass a log folder or a MetaSchedule work dir")
            results.extend(store.import_log(f) for f in found)

    def render(rows) -> str:
        return table([[r.source, r.workloads, r.records, r.added, ", ".join(r.classes)] for r in rows],
                     ["FOLDER", "WORKLOADS", "RECORDS", "NEW", "CPU CLASS"])

    emit(results, as_json, render)


@schedules.command()
@click.argument("cpu_class")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Empty folder for the stock MetaSchedule JSON database.")
@store_option
@json_option
def export(cpu_class: str, out: str, location: str | None, as_json: bool) -> None:
    """Write one CPU class's schedules as a stock MetaSchedule JSON database (TVM's own scripts read it).

    \b
    Example:
      edgetune schedules export llvm/aarch64-linux-gnu/cortex-a72 -o best/a72
    """
    with _open(location) as store:
        written = store.export(cpu_class, out)
    emit({"out": out, "cpu_class": cpu_class, "records": written}, as_json,
         lambda d: f"{d['records']} records of {d['cpu_class']} written to {d['out']}")
