# Shortcuts; the README's commands are the reference.
.PHONY: test bench lint

test:
	.ci/run

lint:
	.venv/bin/ruff check cadscope tests bench infra && .venv/bin/ruff format --check cadscope tests bench infra && .venv/bin/mypy cadscope

# Every figure is a ratio measured in one run; results are appended to bench/RESULTS.md.
bench:
	.venv/bin/python bench/job_overhead.py --write bench/RESULTS.md
	.venv/bin/python bench/export_cost.py --write bench/RESULTS.md
	.venv/bin/python bench/read_window.py --write bench/RESULTS.md
	.venv/bin/python bench/scrape_churn.py --write bench/RESULTS.md
	.venv/bin/python bench/scrape_churn.py --live 64 --write bench/RESULTS.md
	.venv/bin/python bench/scrape_worker_page.py --write bench/RESULTS.md
	.venv/bin/python bench/span_cost.py --write bench/RESULTS.md
	.venv/bin/python bench/task_cpu.py --write bench/RESULTS.md
	.venv/bin/python bench/task_overhead.py --write bench/RESULTS.md
	.venv/bin/python bench/task_steps.py --write bench/RESULTS.md
	.venv/bin/python bench/task_cold.py --write bench/RESULTS.md
	.venv/bin/python bench/task_side_by_side.py --write bench/RESULTS.md
	.venv/bin/python bench/throughput_memory.py --write bench/RESULTS.md
