"""The backup schedule as systemd timers: a full backup weekly, a differential on every other day.

Every PostgreSQL host has both timers; each fires betting-pg-backup@<type>.service
(infra/hostagent/files/betting-pg-backup@.service), and scripts/backup.py exits 0 doing nothing on every
node but the designated one, so the job follows the cluster's roles through a failover.
"""

from __future__ import annotations

from infra.settings import StackSettings

SERVICE_TEMPLATE = "betting-pg-backup@.service"
TIMERS = {"full": "betting-pg-backup-full.timer", "diff": "betting-pg-backup-diff.timer"}


def on_calendar(days: tuple[str, ...], time_of_day: str) -> str:
    """systemd.time(7): `Sun *-*-* 02:00:00 UTC`; UTC said explicitly, whatever the host's zone."""
    return f"{','.join(days)} *-*-* {time_of_day}:00 UTC"


def _timer(kind: str, description: str, calendar: str) -> bytes:
    return (
        "[Unit]\n"
        f"Description={description}\n"
        "\n"
        "[Timer]\n"
        f"OnCalendar={calendar}\n"
        # A node that was down at the time runs the missed backup when it is back (if it is then the designated one).
        "Persistent=true\n"
        f"Unit=betting-pg-backup@{kind}.service\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    ).encode()


def render_backup_timers(settings: StackSettings) -> dict[str, bytes]:
    backups = settings.backups
    return {
        f"backup/{TIMERS['full']}": _timer("full", "Weekly full pgBackRest backup, verified by a restore",
                                           on_calendar((backups.full_backup_day,), backups.backup_time)),
        f"backup/{TIMERS['diff']}": _timer("diff", "Daily differential pgBackRest backup, verified by a restore",
                                           on_calendar(backups.differential_days, backups.backup_time)),
    }
