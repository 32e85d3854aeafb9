"""Reports: the comparison record (results.jsonl), tables, PNG figures, report.md and report.html."""
