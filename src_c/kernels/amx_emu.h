/* amx_emu.h - the software model of the AMX tile instructions (amx_emu.c), under the names of
 * the real intrinsics, so that gemm_amx.c builds unchanged against it (KT_AMX_EMULATE).
 *
 * State is per thread, like the tile registers. A fault (what hardware raises as #GP or #UD)
 * leaves the destination unchanged and is recorded: kt_amx_emu_thread_faults() counts this
 * thread's, kt_amx_emu_first_fault() keeps the first message of the process. */
#ifndef KTSFT_AMX_EMU_H
#define KTSFT_AMX_EMU_H

#include "../internal.h"

/* Faults recorded on the calling thread so far. */
uint64_t kt_amx_emu_thread_faults(void);

#define _tile_loadconfig(cfg) kt_amx_emu_ldtilecfg(cfg)
#define _tile_storeconfig(cfg) kt_amx_emu_sttilecfg(cfg)
#define _tile_release() kt_amx_emu_tilerelease()
#define _tile_loadd(t, base, stride) kt_amx_emu_tileloadd(t, base, (int64_t)(stride))
#define _tile_stored(t, base, stride) kt_amx_emu_tilestored(t, base, (int64_t)(stride))
#define _tile_zero(t) kt_amx_emu_tilezero(t)
#define _tile_dpbf16ps(d, a, b) kt_amx_emu_dp(KT_AMX_TDPBF16PS, d, a, b)
#define _tile_dpbssd(d, a, b) kt_amx_emu_dp(KT_AMX_TDPBSSD, d, a, b)
#define _tile_dpbsud(d, a, b) kt_amx_emu_dp(KT_AMX_TDPBSUD, d, a, b)
#define _tile_dpbusd(d, a, b) kt_amx_emu_dp(KT_AMX_TDPBUSD, d, a, b)
#define _tile_dpbuud(d, a, b) kt_amx_emu_dp(KT_AMX_TDPBUUD, d, a, b)

#endif /* KTSFT_AMX_EMU_H */
