#include <sqlite3.h>
#include "CSQLiteConfig.h"

int payop_sqlite3_config_memstatus(int on) {
    return sqlite3_config(SQLITE_CONFIG_MEMSTATUS, on);
}
