#pragma once
// The order in which one pipeline stage runs the forwards and backwards of a step's m
// micro-batches.
//
// Contract:
// - actions(schedule, P, stage, m) lists 2m actions: each micro-batch's forward once and its
//   backward once, the backward after the forward. Backwards run in micro-batch order 0..m-1
//   in both schedules, so both accumulate the same gradients in the same order (bit-identical
//   results; only time and memory differ).
// - gpipe: all m forwards, then all m backwards: every stage holds m micro-batches' activations.
// - 1f1b (PipeDream-Flush): stage s first runs min(P - s - 1, m) forwards (warm-up), then
//   alternates one forward and one backward, then runs the remaining backwards: at most
//   P - s micro-batches are in flight on stage s, whatever m is.
// - Run with blocking receives and asynchronous sends on two channels per stage pair (one per
//   direction), both schedules are free of deadlock: every receive a stage waits for is sent by
//   a neighbour before that neighbour waits for anything this stage sends later.
// - bubble_fraction(P, m) is the idle share of a step in theory, (P - 1) / (m + P - 1), for
//   stages of equal cost whose backward costs a fixed multiple of the forward.

#include <vector>

#include "mpitrain/config/choices.h"

namespace mpitrain::pipeline {

struct Action {
  enum Kind { forward, backward } kind;
  int micro;
  bool operator==(const Action& other) const { return kind == other.kind && micro == other.micro; }
};

std::vector<Action> actions(config::PipelineSchedule schedule, int stages, int stage, int micro_batches);

/// The most micro-batches a stage holds activations for at once in actions()' order.
int max_in_flight(const std::vector<Action>& actions);

double bubble_fraction(int stages, int micro_batches);

}  // namespace mpitrain::pipeline
