#ifndef PAYOP_IPND_CSQLITECONFIG_H
#define PAYOP_IPND_CSQLITECONFIG_H

/// `sqlite3_config` is variadic, and Swift does not call variadic C functions: the daemon's one call to
/// it goes through this. Returns SQLite's result code: `SQLITE_OK`, or `SQLITE_MISUSE` once the library
/// has been initialized (the first connection opened), when the setting can no longer change.
int payop_sqlite3_config_memstatus(int on);

#endif
