/* Copyright © 2023-2024 Apple Inc. */

#ifndef MLX_HALF_H
#define MLX_HALF_H

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC) || defined(__aarch64__)
#define HAS_FLOAT16
#include <arm_fp16.h>
typedef __fp16 float16_t;
#endif

#if defined(__ARM_FEATURE_BF16) || defined(__aarch64__)
#define HAS_BFLOAT16
#include <arm_bf16.h>
typedef __bf16 bfloat16_t;
#endif

/* Patched for mlx-sys's vendored copy (your_ai): elsewhere than on Arm, declare both types
 * with the same storage (16 bits) so the array data and item functions exist. C++ (mlx-c
 * itself) uses MLX's own half types, so item<T>() and data<T>() read MLX's storage; C (bindgen)
 * sees __fp16 (clang's storage-only half, bound as a 16-bit struct) and a 16-bit integer for
 * bfloat16, the bindings mlx-rs expects on Apple silicon. */
#if !defined(HAS_FLOAT16) && !defined(__cplusplus) && defined(__clang__)
#define HAS_FLOAT16
typedef __fp16 float16_t;
#endif
#if !defined(HAS_BFLOAT16) && !defined(__cplusplus)
#include <stdint.h>
#define HAS_BFLOAT16
typedef uint16_t bfloat16_t;
#endif

#ifdef __cplusplus
}
#endif

#if defined(__cplusplus) && !defined(HAS_FLOAT16)
#include "mlx/types/half_types.h"
#define HAS_FLOAT16
typedef mlx::core::float16_t float16_t;
#endif
#if defined(__cplusplus) && !defined(HAS_BFLOAT16)
#include "mlx/types/half_types.h"
#define HAS_BFLOAT16
typedef mlx::core::bfloat16_t bfloat16_t;
#endif

#endif
