/* CSV fields (see csv.h). Kept apart from the code that fetches the rows so
 * that the quoting rules are tested on their own. */
#include "csv.h"

#include "util.h"

#include <string.h>

char *csv_field(const char *s, int guard)
{
    if (!s)
        s = "";
    int formula = guard && s[0] && strchr("=+-@\t\r", s[0]);
    int quote = formula || strpbrk(s, ",\"\r\n") != NULL;
    if (!quote)
        return xstrdup(s);
    size_t n = strlen(s);
    /* worst case: every byte a quote, plus apostrophe, two quotes, NUL */
    char *out = xmalloc(2 * n + 4);
    char *p = out;
    *p++ = '"';
    if (formula)
        *p++ = '\'';
    for (const char *c = s; *c; c++) {
        if (*c == '"')
            *p++ = '"';
        *p++ = *c;
    }
    *p++ = '"';
    *p = '\0';
    return out;
}
