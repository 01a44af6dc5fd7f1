/* amx_emu.c - a software model of the AMX tile instructions, after the pseudocode of Intel's
 * ISA reference (LDTILECFG, STTILECFG, TILERELEASE, TILELOADD, TILESTORED, TILEZERO, TDPBF16PS,
 * TDPB[SU][SU]D), so that the amx kernels run and are tested on CPUs without AMX.
 *
 * What it models:
 *   - palette 1 only: 8 tiles of at most 16 rows x 64 bytes; palette 0 is the init state;
 *   - ldtilecfg validation (palette, reserved bytes, rows <= 16, colsb <= 64); all tiles zeroed;
 *   - loads and stores of the configured rows and bytes per row from start_row on, with a byte
 *     stride; the rest of a loaded tile is zeroed;
 *   - the dot products on dst.rows x dst.colsb / 4 elements, K = a.colsb / 4, each row written
 *     back with its bytes beyond colsb zeroed and the rows beyond dst.rows zeroed;
 *   - tdpbf16ps: each step an FMA rounded to nearest even, bf16 and fp32 input denormals read as
 *     zero, denormal results flushed to zero;
 *   - int8 quads: exact, wrapping modulo 2^32;
 *   - the faults: unconfigured state, unconfigured or out-of-range tiles, repeated operands and
 *     every shape rule of the dot products. */
#include "amx_emu.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>

enum { NTILES = 8, MAX_ROWS = 16, MAX_COLSB = 64 };

typedef struct tile_state {
  int configured;
  uint8_t palette, start_row;
  uint16_t colsb[NTILES];
  uint8_t rows[NTILES];
  uint8_t data[NTILES][MAX_ROWS][MAX_COLSB];
  uint64_t faults;
  char last_fault[160];
} tile_state;

static __thread tile_state st;

static char first_fault[160];
static int first_fault_set; /* 0 none, 1 being written, 2 set */

static int fault(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int fault(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(st.last_fault, sizeof st.last_fault, fmt, ap);
  va_end(ap);
  st.faults++;
  int expected = 0;
  if (__atomic_compare_exchange_n(&first_fault_set, &expected, 1, 0, __ATOMIC_ACQ_REL,
                                  __ATOMIC_ACQUIRE)) {
    memcpy(first_fault, st.last_fault, sizeof first_fault);
    __atomic_store_n(&first_fault_set, 2, __ATOMIC_RELEASE);
  }
  return -1;
}

uint64_t kt_amx_emu_thread_faults(void) { return st.faults; }

const char *kt_amx_emu_last_fault(void) { return st.last_fault; }

const char *kt_amx_emu_first_fault(void) {
  return __atomic_load_n(&first_fault_set, __ATOMIC_ACQUIRE) == 2 ? first_fault : NULL;
}

void kt_amx_emu_clear_faults(void) {
  __atomic_store_n(&first_fault_set, 0, __ATOMIC_RELEASE);
  st.last_fault[0] = '\0';
}

static void init_state(void) {
  st.configured = 0;
  st.palette = st.start_row = 0;
  memset(st.colsb, 0, sizeof st.colsb);
  memset(st.rows, 0, sizeof st.rows);
  memset(st.data, 0, sizeof st.data);
}

int kt_amx_emu_tilerelease(void) {
  init_state();
  return 0;
}

/* Layout: byte 0 palette, 1 start_row, 2-15 reserved, 16-31 colsb of tiles 0-7 (little-endian
 * 16-bit), 32-47 reserved, 48-55 rows of tiles 0-7, 56-63 reserved. */
int kt_amx_emu_ldtilecfg(const void *cfg) {
  const uint8_t *b = cfg;
  if (b[0] == 0) return kt_amx_emu_tilerelease();
  if (b[0] != 1) return fault("ldtilecfg: #GP: palette %d is not supported (0 or 1)", b[0]);
  for (int i = 2; i < 64; i++) {
    const int reserved = i < 16 || (i >= 32 && i < 48) || i >= 56;
    if (reserved && b[i] != 0)
      return fault("ldtilecfg: #GP: reserved byte %d is %d, must be zero", i, b[i]);
  }
  if (b[1] >= MAX_ROWS) return fault("ldtilecfg: #GP: start_row %d >= %d", b[1], MAX_ROWS);
  for (int t = 0; t < NTILES; t++) {
    const int colsb = b[16 + 2 * t] | b[17 + 2 * t] << 8, rows = b[48 + t];
    if (colsb > MAX_COLSB)
      return fault("ldtilecfg: #GP: tile %d colsb %d > %d", t, colsb, MAX_COLSB);
    if (rows > MAX_ROWS) return fault("ldtilecfg: #GP: tile %d rows %d > %d", t, rows, MAX_ROWS);
  }
  init_state();
  st.configured = 1;
  st.palette = 1;
  st.start_row = b[1];
  for (int t = 0; t < NTILES; t++) {
    st.colsb[t] = (uint16_t)(b[16 + 2 * t] | b[17 + 2 * t] << 8);
    st.rows[t] = b[48 + t];
  }
  return 0;
}

int kt_amx_emu_sttilecfg(void *cfg) {
  uint8_t *b = cfg;
  memset(b, 0, 64);
  if (!st.configured) return 0; /* the init state stores as all zero */
  b[0] = st.palette;
  b[1] = st.start_row;
  for (int t = 0; t < NTILES; t++) {
    b[16 + 2 * t] = (uint8_t)(st.colsb[t] & 0xff);
    b[17 + 2 * t] = (uint8_t)(st.colsb[t] >> 8);
    b[48 + t] = st.rows[t];
  }
  return 0;
}

/* A tile operand: the state configured, the number in range, the tile given a shape. */
static int check_tile(const char *insn, int t) {
  if (!st.configured) return fault("%s: #UD: tiles are not configured (ldtilecfg first)", insn);
  if (t < 0 || t >= NTILES) return fault("%s: #UD: no tile register tmm%d", insn, t);
  if (st.rows[t] == 0 || st.colsb[t] == 0)
    return fault("%s: #UD: tmm%d is not configured (rows %d, colsb %d)", insn, t, st.rows[t],
                 st.colsb[t]);
  return 0;
}

int kt_amx_emu_tileloadd(int t, const void *base, int64_t stride) {
  if (check_tile("tileloadd", t)) return -1;
  const uint8_t *src = base;
  for (int r = 0; r < MAX_ROWS; r++) {
    uint8_t *row = st.data[t][r];
    if (r >= st.start_row && r < st.rows[t]) {
      memcpy(row, src + r * stride, st.colsb[t]);
      memset(row + st.colsb[t], 0, (size_t)(MAX_COLSB - st.colsb[t]));
    } else if (r >= st.rows[t]) {
      memset(row, 0, MAX_COLSB);
    }
  }
  st.start_row = 0;
  return 0;
}

int kt_amx_emu_tilestored(int t, void *base, int64_t stride) {
  if (check_tile("tilestored", t)) return -1;
  uint8_t *dst = base;
  for (int r = st.start_row; r < st.rows[t]; r++)
    memcpy(dst + r * stride, st.data[t][r], st.colsb[t]);
  st.start_row = 0;
  return 0;
}

int kt_amx_emu_tilezero(int t) {
  if (check_tile("tilezero", t)) return -1;
  memset(st.data[t], 0, sizeof st.data[t]);
  return 0;
}

static float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

/* Denormals (exponent field 0, fraction not) become zero of the same sign. */
static float flush(float f) {
  const uint32_t u = f32_bits(f);
  return (u & 0x7f800000u) == 0 ? f32_from_bits(u & 0x80000000u) : f;
}

static uint32_t load32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

static void store32(uint8_t *p, uint32_t v) { memcpy(p, &v, sizeof v); }

/* One 32-bit element of a, one of b: the pair of bf16 or the quad of bytes. */
static uint32_t dot_i8(kt_amx_op op, uint32_t acc, uint32_t x, uint32_t y) {
  const int sx = op == KT_AMX_TDPBSSD || op == KT_AMX_TDPBSUD;
  const int sy = op == KT_AMX_TDPBSSD || op == KT_AMX_TDPBUSD;
  for (int i = 0; i < 4; i++) {
    const uint8_t bx = (uint8_t)(x >> (8 * i)), by = (uint8_t)(y >> (8 * i));
    const int32_t vx = sx ? (int32_t)(int8_t)bx : (int32_t)bx;
    const int32_t vy = sy ? (int32_t)(int8_t)by : (int32_t)by;
    acc += (uint32_t)(vx * vy); /* |vx vy| <= 2^16: exact; the sum wraps modulo 2^32 */
  }
  return acc;
}

static float dot_bf16(float acc, uint32_t x, uint32_t y) {
  for (int i = 0; i < 2; i++) {
    const float ax = flush(f32_from_bits((x >> (16 * i)) << 16));
    const float by = flush(f32_from_bits((y >> (16 * i)) << 16));
    acc = flush(fmaf(ax, by, flush(acc)));
  }
  return acc;
}

static const char *const op_names[] = {"tdpbf16ps", "tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud"};

int kt_amx_emu_dp(kt_amx_op op, int d, int a, int b) {
  if ((int)op < 0 || op > KT_AMX_TDPBUUD) return fault("tdp: #UD: unknown operation %d", (int)op);
  const char *name = op_names[op];
  if (check_tile(name, d) || check_tile(name, a) || check_tile(name, b)) return -1;
  if (d == a || d == b || a == b)
    return fault("%s: #UD: operands tmm%d, tmm%d, tmm%d are not distinct", name, d, a, b);
  const int m = st.rows[d], n = st.colsb[d] / 4, k = st.colsb[a] / 4;
  if (st.rows[a] != m) return fault("%s: #UD: a.rows %d != dst.rows %d", name, st.rows[a], m);
  if (st.colsb[b] != st.colsb[d])
    return fault("%s: #UD: b.colsb %d != dst.colsb %d", name, st.colsb[b], st.colsb[d]);
  if (st.rows[b] != k) return fault("%s: #UD: a.colsb / 4 = %d != b.rows %d", name, k, st.rows[b]);
  for (int r = 0; r < m; r++) {
    uint8_t tmp[MAX_COLSB];
    memcpy(tmp, st.data[d][r], sizeof tmp);
    for (int kk = 0; kk < k; kk++) {
      const uint32_t x = load32(st.data[a][r] + 4 * kk);
      for (int j = 0; j < n; j++) {
        const uint32_t y = load32(st.data[b][kk] + 4 * j);
        const uint32_t acc = load32(tmp + 4 * j);
        store32(tmp + 4 * j, op == KT_AMX_TDPBF16PS ? f32_bits(dot_bf16(f32_from_bits(acc), x, y))
                                                    : dot_i8(op, acc, x, y));
      }
    }
    memcpy(st.data[d][r], tmp, st.colsb[d]);
    memset(st.data[d][r] + st.colsb[d], 0, (size_t)(MAX_COLSB - st.colsb[d]));
  }
  for (int r = m; r < MAX_ROWS; r++) memset(st.data[d][r], 0, MAX_COLSB);
  st.start_row = 0;
  return 0;
}
