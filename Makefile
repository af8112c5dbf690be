# Shortcuts; the README's commands are the reference.
.PHONY: test fast bench lint

test:
	.ci/run

fast:
	.venv/bin/python -m pytest -m "not slow"

lint:
	.venv/bin/ruff check cadscope tests bench infra && .venv/bin/ruff format --check cadscope tests bench infra && .venv/bin/mypy cadscope

# Every figure is a ratio measured in one run (docs/performance.md); each script prints a Markdown table.
bench:
	.venv/bin/python bench/job_overhead.py
	.venv/bin/python bench/task_overhead.py
	.venv/bin/python bench/scrape_churn.py --live 64 --dead 10000
	.venv/bin/python bench/throughput_memory.py
	.venv/bin/python bench/journal_cost.py
	.venv/bin/python bench/usercode_overhead.py
	.venv/bin/python bench/containment_cost.py
