/* stderr capture for cmocka suites that check what a module logs:
 * capture_begin() points stderr at a temporary file, capture_end() restores
 * it and returns what was written. Included by the test programs only. */
#ifndef LINLI_TEST_CAPTURE_H
#define LINLI_TEST_CAPTURE_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmocka.h>

static int s_saved_stderr = -1;
static FILE *s_capture;

static void s_capture_begin(void)
{
    fflush(stderr);
    s_capture = tmpfile();
    assert_non_null(s_capture);
    s_saved_stderr = dup(STDERR_FILENO);
    assert_true(s_saved_stderr >= 0);
    assert_true(dup2(fileno(s_capture), STDERR_FILENO) >= 0);
}

/* Restores stderr and returns what was written (caller frees), or NULL
 * when nothing was being captured. Safe to call twice. */
static char *s_capture_end(void)
{
    if (s_saved_stderr < 0)
        return NULL;
    fflush(stderr);
    dup2(s_saved_stderr, STDERR_FILENO);
    close(s_saved_stderr);
    s_saved_stderr = -1;
    long n = ftell(s_capture);
    char *text = malloc(n > 0 ? (size_t)n + 1 : 1);
    assert_non_null(text);
    rewind(s_capture);
    size_t got = n > 0 ? fread(text, 1, (size_t)n, s_capture) : 0;
    text[got] = '\0';
    fclose(s_capture);
    s_capture = NULL;
    return text;
}

#endif
