# The two commands: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)

.PHONY: run test lint format bench setup clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python manage.py migrate --noinput -v0
	$(BIN)/python manage.py collectstatic --noinput -v0
	$(BIN)/python manage.py demo_fleet
	env -u REDIS_URL $(BIN)/python manage.py broker_acl --out var/broker
	@echo ""
	@echo "  Admin:  http://127.0.0.1:8000/admin/   users admin / operator / maintainer, password: $$(cat var/demo-password)"
	@echo "  Flower: http://127.0.0.1:5555/         user admin, same password"
	@echo "  Repo:   http://127.0.0.1:8001/metadata/timestamp.json"
	@echo "  Mail:   hotfix notices land in var/mail/ (a local SMTP sink on 127.0.0.1:1025)"
	@echo "  Redis:  every process is its own broker user (var/broker/); commands by hand take the control user:"
	@echo "          TGP_REDIS_URL_FILE=var/broker/control.url $(BIN)/python manage.py autoupdate gw1 --yes --wait"
	@echo ""
	env -u REDIS_URL PATH="$(CURDIR)/$(BIN):$$PATH" FLOWER_BASIC_AUTH="admin:$$(cat var/demo-password)" \
	  TGP_EMAIL_HOST=127.0.0.1 TGP_EMAIL_PORT=1025 $(BIN)/honcho start -f Procfile

# Two pytest-xdist workers: the workflow tests mostly wait for their processes, and
# side by side they keep the suite within 15 minutes on 2 cores (README: Development).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var
