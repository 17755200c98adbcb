// moeflux: the command-line front end. One subcommand per job (cmd_*.cpp); every error is one
// line on stderr naming the file/tensor/field at fault, with a non-zero exit.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <new>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "util/error.h"

int main(int argc, char** argv) {
  using namespace moeflux::cli;
  CLI::App app{"moeflux: Mixture-of-Experts inference that streams experts from disk"};
  app.set_version_flag("--version", std::string("moeflux ") + MOEFLUX_VERSION);
  app.require_subcommand(1);
  std::vector<Command> commands;
  for (auto add : {add_convert, add_inspect, add_eval, add_run, add_chat, add_tokenize,
                   add_detokenize, add_synth, add_bench,
                   add_perplexity, add_routing, add_cache_sim, add_serve}) commands.push_back(add(app));
  // CLI11 reads an unknown first word as a stray positional and says "A subcommand is
  // required"; name the word instead.
  if (argc > 1 && argv[1][0] != '-') {
    const std::string word = argv[1];
    bool known = false;
    for (const Command& c : commands) known = known || c.app->check_name(word);
    if (!known) {
      fmt::print(stderr, "moeflux: error: unknown command '{}' (see moeflux --help)\n", word);
      return 1;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (const Command& c : commands)
      if (c.app->parsed()) return c.run();
  } catch (const std::bad_alloc&) {  // what() is "std::bad_alloc"
    fmt::print(stderr, "moeflux: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "moeflux: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
