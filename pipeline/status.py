"""`status`: ledger summary of last runs, failed and pending deliveries."""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.ledger import Ledger
from pipeline.stores import open_store


def summary(config: Config, last: int = 5) -> dict[str, Any]:
    store = open_store(config.state.url, config.state.options)
    try:
        ledger = Ledger(store)
        entries = ledger.entries()
        runs = [{
            "run_id": r["run_id"], "command": r["command"], "status": r["status"],
            "deliveries": len(r["deliveries"]), "received": r["totals"]["records_received"],
            "matched": r["totals"]["matched"],
        } for r in ledger.runs(last)]
    finally:
        store.close()

    def rows(status: str) -> list[dict[str, Any]]:
        return [{"feed": e.feed, "delivery": e.delivery, "status": e.status, "reason": e.reason}
                for e in entries if e.status == status]

    return {"runs": runs, "failed": rows("failed"), "pending": rows("incomplete"),
            "processed": sum(1 for e in entries if e.status == "processed")}
