// Host checks of the sm90 forward's work tiles (sm90/fwd_tile.h), through
// the functions the kernel and its launch call:
// - order: FwdTile::make maps tiles 0 .. n-1 onto every (query tile, head,
//   batch row) exactly once, in sections of consecutive (head, batch row)
//   pairs, one or fwd_section_rows of them (checked too): within a section
//   the query tiles from the last one down, each over the section's rows in
//   order (one row a section: the order of a plain grid);
// - schedule: a simulated launch of fwd_num_ctas CTAs, persistent or not,
//   in which CTAs move in random order (a persistent CTA runs tile
//   blockIdx.x first, then claims gridDim.x + counter++, as the producer
//   does), runs every tile exactly once and stops every CTA.
// Prints the number of mismatches and exits non-zero when there is any.
#include <cstdio>
#include <random>
#include <vector>

#include "sm90/fwd_tile.h"

namespace {

using jax_flash::sm90::FwdTile;
using jax_flash::sm90::fwd_num_ctas;
using jax_flash::sm90::fwd_section_rows;

// Sections fill the GPU's CTA slots without exceeding them, and are one
// row where a head alone fills them.
long check_section_rows(int num_m, int num_sms) {
  const int section = fwd_section_rows(num_m, num_sms);
  return section < 1 || (num_sms > num_m && section * num_m > num_sms) ||
         (num_sms > num_m && (section + 1) * num_m <= num_sms) ||
         (num_m >= num_sms && section != 1);
}

// The order written out as loops, against FwdTile::make tile by tile.
long check_order(int num_m, int heads, int batch, int section) {
  const int rows = heads * batch;
  long bad = 0;
  std::vector<int> seen(rows * num_m, 0);
  int t = 0;
  for (int first = 0; first < rows; first += section) {
    const int last = first + section < rows ? first + section : rows;
    for (int m = num_m - 1; m >= 0; --m) {
      for (int row = first; row < last; ++row, ++t) {
        const FwdTile w = FwdTile::make(t, num_m, heads, batch, section);
        const bool ok =
            w.m_block == m && w.h == row % heads && w.b == row / heads;
        if (ok) ++seen[row * num_m + m];
        bad += !ok;
      }
    }
  }
  bad += t != rows * num_m;
  for (int count : seen) bad += count != 1;
  return bad;
}

long check_schedule(int tiles, int num_sms, bool persistent,
                    std::mt19937* rng) {
  const int ctas = fwd_num_ctas(tiles, num_sms, persistent);
  long bad = ctas < 1 || ctas > tiles || (persistent && ctas > num_sms) ||
             (!persistent && ctas != tiles);
  if (bad) return bad;
  std::vector<int> ran(tiles, 0), tile(ctas), active(ctas);
  for (int c = 0; c < ctas; ++c) tile[c] = active[c] = c;
  int counter = 0;
  while (!active.empty()) {
    const size_t i = (*rng)() % active.size();
    const int c = active[i];
    if (tile[c] >= tiles) {  // no work left: the CTA stops
      active.erase(active.begin() + i);
      continue;
    }
    ++ran[tile[c]];
    if (persistent) {
      tile[c] = ctas + counter++;
    } else {
      active.erase(active.begin() + i);  // one tile per CTA
    }
  }
  for (int count : ran) bad += count != 1;
  return bad;
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  long cases = 0, mismatches = 0;
  for (int num_m = 1; num_m <= 45; num_m += num_m < 10 ? 1 : 7) {
    for (int heads = 1; heads <= 13; heads += 3) {
      for (int batch = 1; batch <= 5; batch += 2) {
        mismatches += check_order(num_m, heads, batch, 1);
        for (int num_sms : {1, 7, 132}) {
          mismatches += check_section_rows(num_m, num_sms);
          mismatches += check_order(num_m, heads, batch,
                                    fwd_section_rows(num_m, num_sms));
          for (bool persistent : {true, false}) {
            mismatches += check_schedule(num_m * heads * batch, num_sms,
                                         persistent, &rng);
          }
        }
        ++cases;
      }
    }
  }
  std::printf("forward tiles: %ld shapes, mismatches: %ld\n", cases,
              mismatches);
  return mismatches != 0;
}
