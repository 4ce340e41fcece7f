#ifndef PAYOP_IPND_CSQLITECONFIG_H
#define PAYOP_IPND_CSQLITECONFIG_H

/// `sqlite3_config` is variadic, and Swift does not call variadic C functions: the daemon's one call to
/// it goes through this. Returns SQLite's result code: `SQLITE_OK`, or `SQLITE_MISUSE` once the library
/// has been initialized (the first connection opened), when the setting can no longer change.
int payop_sqlite3_config_memstatus(int on);

struct sqlite3;

/// `sqlite3_db_config(db, SQLITE_DBCONFIG_DEFENSIVE, on, NULL)`, also variadic: the tests play a library
/// that turns defensive mode on by default (macOS's) with it.
int payop_sqlite3_db_config_defensive(struct sqlite3 *db, int on);

#endif
