/* CSV as RFC 4180 writes it, for linlictl's exports (timebank statements),
 * with the guard spreadsheets need against formula injection. */
#ifndef LINLI_CTL_CSV_H
#define LINLI_CTL_CSV_H

/* guard argument of csv_field: the field holds text people typed. */
#define CSV_TEXT 1

/* Returns s as one CSV field, a new string the caller frees: s unchanged
 * when it holds no comma, double quote, CR or LF; else s in double quotes
 * with each double quote doubled. With guard set, a value that begins with
 * = + - @ (or tab or CR, which spreadsheets also act on) gets a leading
 * apostrophe and is quoted, so a spreadsheet shows it as text instead of
 * evaluating it. NULL is the empty field. Never fails (allocation aborts). */
char *csv_field(const char *s, int guard);

#endif
