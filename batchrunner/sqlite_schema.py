"""The SQLite schema at `database.SCHEMA_HEAD`, as the migrations leave it.

A new SQLite database is created from these statements in one transaction, and stamped with
the head revision as alembic would stamp it: importing SQLAlchemy and alembic and running the
migrations one by one took a second, the first second of every first submit. The text is what
SQLite keeps in `sqlite_master` after the migrations, statement for statement;
`tests/test_migrations.py` holds the two equal, and prints these statements afresh when a new
migration makes them differ.
"""

from __future__ import annotations

from typing import Final

#: In the order the migrations create them (`sqlite_master`'s rowid order).
STATEMENTS: Final = (
    (
        "CREATE TABLE alembic_version (\n"
        "\tversion_num VARCHAR(32) NOT NULL, \n"
        "\tCONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)\n"
        ")"
    ),
    (
        "CREATE TABLE batches (\n"
        "\tid VARCHAR(40) NOT NULL, \n"
        "\tname VARCHAR(200) NOT NULL, \n"
        "\tsource_file TEXT NOT NULL, \n"
        "\tcontent_sha256 VARCHAR(64) NOT NULL, \n"
        "\tbase_url TEXT NOT NULL, \n"
        "\tapi_key_env VARCHAR(200) NOT NULL, \n"
        "\toptions JSON NOT NULL, \n"
        "\ttotal_jobs INTEGER NOT NULL, \n"
        "\tinvalid_lines INTEGER NOT NULL, \n"
        "\tcreated_at FLOAT NOT NULL, \n"
        "\tcancelled_at FLOAT, meta_keys TEXT, \n"
        "\tCONSTRAINT pk_batches PRIMARY KEY (id), \n"
        "\tCONSTRAINT uq_batches_content_sha256 UNIQUE (content_sha256)\n"
        ")"
    ),
    (
        "CREATE TABLE invalid_lines (\n"
        "\tid INTEGER NOT NULL, \n"
        "\tbatch_id VARCHAR(40) NOT NULL, \n"
        "\tline INTEGER NOT NULL, \n"
        "\treason TEXT NOT NULL, \n"
        "\tCONSTRAINT pk_invalid_lines PRIMARY KEY (id), \n"
        "\tCONSTRAINT fk_invalid_lines_batch_id_batches FOREIGN KEY(batch_id) "
        "REFERENCES batches (id) ON DELETE CASCADE\n"
        ")"
    ),
    ("CREATE INDEX ix_invalid_lines_batch_id ON invalid_lines (batch_id)"),
    (
        "CREATE TABLE workers (\n"
        "\tid VARCHAR(64) NOT NULL, \n"
        "\tbatch_id VARCHAR(40) NOT NULL, \n"
        "\thost VARCHAR(255) NOT NULL, \n"
        "\tpid INTEGER NOT NULL, \n"
        "\tstarted_at FLOAT NOT NULL, \n"
        "\theartbeat_at FLOAT NOT NULL, \n"
        "\tstopped_at FLOAT, \n"
        "\tpaused_until FLOAT, \n"
        "\tsent INTEGER NOT NULL, \n"
        "\tsucceeded INTEGER NOT NULL, \n"
        "\tfailed INTEGER NOT NULL, \n"
        "\ttokens BIGINT NOT NULL, recent_requests_per_s FLOAT, recent_tokens_per_s FLOAT,"
        " spent_usd FLOAT, reserved_usd FLOAT, \n"
        "\tCONSTRAINT pk_workers PRIMARY KEY (id), \n"
        "\tCONSTRAINT fk_workers_batch_id_batches FOREIGN KEY(batch_id) "
        "REFERENCES batches (id) ON DELETE CASCADE\n"
        ")"
    ),
    ("CREATE INDEX ix_workers_batch_id ON workers (batch_id)"),
    (
        'CREATE TABLE "results" (\n'
        "\tjob_id INTEGER NOT NULL, \n"
        "\tbatch_id VARCHAR(40) NOT NULL, \n"
        "\tstatus_code INTEGER NOT NULL, \n"
        "\tresponse TEXT NOT NULL, \n"
        "\trequest_id VARCHAR(200), \n"
        "\tmodel VARCHAR(200), \n"
        "\tprompt_tokens INTEGER, \n"
        "\tcompletion_tokens INTEGER, \n"
        "\tcached_tokens INTEGER, \n"
        "\treasoning_tokens INTEGER, \n"
        "\ttotal_tokens INTEGER, \n"
        "\tschema_valid BOOLEAN, \n"
        "\tlatency_ms FLOAT NOT NULL, \n"
        "\tattempts INTEGER NOT NULL, \n"
        "\tfinished_at FLOAT NOT NULL, \n"
        "\tCONSTRAINT pk_results PRIMARY KEY (job_id)\n"
        ")"
    ),
    (
        'CREATE TABLE "attempts" (\n'
        "\tid INTEGER NOT NULL, \n"
        "\tjob_id INTEGER NOT NULL, \n"
        "\tbatch_id VARCHAR(40) NOT NULL, \n"
        "\tworker_id VARCHAR(64) NOT NULL, \n"
        "\tstatus_code INTEGER, \n"
        "\terror_kind VARCHAR(64), \n"
        "\tlatency_ms FLOAT NOT NULL, \n"
        "\trequest_id VARCHAR(200), \n"
        "\tstarted_at FLOAT NOT NULL, \n"
        "\tCONSTRAINT pk_attempts PRIMARY KEY (id)\n"
        ")"
    ),
    (
        'CREATE TABLE "jobs" (\n'
        "\tid INTEGER NOT NULL, \n"
        "\tbatch_id VARCHAR(40) NOT NULL, \n"
        "\tline INTEGER NOT NULL, \n"
        "\tcustom_id VARCHAR(512) NOT NULL, \n"
        "\tmethod VARCHAR(10) NOT NULL, \n"
        "\tendpoint VARCHAR(200) NOT NULL, \n"
        "\tbody TEXT NOT NULL, \n"
        "\tmeta TEXT, \n"
        "\tmodel VARCHAR(200) NOT NULL, \n"
        "\tstream BOOLEAN NOT NULL, \n"
        "\test_tokens INTEGER NOT NULL, \n"
        "\tstate VARCHAR(16) NOT NULL, \n"
        "\tattempts INTEGER NOT NULL, \n"
        "\tlease_owner VARCHAR(64), \n"
        "\tlease_token VARCHAR(64), \n"
        "\tlease_expires_at FLOAT, \n"
        "\tnot_before FLOAT, \n"
        "\terror_kind VARCHAR(64), \n"
        "\tlast_status INTEGER, \n"
        "\tlast_error TEXT, \n"
        "\tcreated_at FLOAT NOT NULL, \n"
        "\tupdated_at FLOAT NOT NULL, \n"
        "\tfinished_at FLOAT, \n"
        "\tCONSTRAINT pk_jobs PRIMARY KEY (id), \n"
        "\tCONSTRAINT uq_jobs_batch_id UNIQUE (batch_id, custom_id)\n"
        ")"
    ),
    ("CREATE INDEX ix_jobs_claim ON jobs (batch_id, state, id)"),
    ("CREATE UNIQUE INDEX uq_attempts_job_started ON attempts (job_id, started_at)"),
    (
        "CREATE TABLE discarded_answers (\n"
        "\tjob_id INTEGER NOT NULL, \n"
        "\tstarted_at FLOAT NOT NULL, \n"
        "\tbatch_id VARCHAR(40) NOT NULL, \n"
        "\tmodel VARCHAR(200) NOT NULL, \n"
        "\tprompt_tokens INTEGER NOT NULL, \n"
        "\tcached_tokens INTEGER NOT NULL, \n"
        "\tcompletion_tokens INTEGER NOT NULL, \n"
        "\treasoning_tokens INTEGER NOT NULL, \n"
        "\ttotal_tokens INTEGER NOT NULL, \n"
        "\tCONSTRAINT pk_discarded_answers PRIMARY KEY (job_id, started_at)\n"
        ")"
    ),
    ("CREATE INDEX ix_discarded_answers_batch_id ON discarded_answers (batch_id)"),
)
