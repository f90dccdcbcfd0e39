/* Patched for mlx-sys's vendored copy (your_ai): symbols mlx-rs takes from macOS, provided
 * where MLX is linked from a prebuilt library on another system (see system_mlx.rs). */

#include <stdint.h>
#include <time.h>

/* mlx-rs seeds RandomState::new() with mach_approximate_time(); any monotonic nanosecond
 * clock serves that purpose. */
uint64_t mach_approximate_time(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
