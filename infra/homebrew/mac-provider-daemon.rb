# Homebrew formula for the Mac Provider daemon (a tap formula: `brew tap <org>/mac-provider`).
#
#   brew install mac-provider-daemon
#   mac-provider-daemon login --config "$(brew --prefix)/etc/mac-provider/daemon.env" --url https://<pool>
#   brew services start mac-provider-daemon
#
# `login` signs the Mac in (approve the code it prints in your browser) and keeps its provider
# token in the login keychain; daemon.env holds the rest (model, slots, memory budget).
#
# Logs: $(brew --prefix)/var/log/mac-provider-daemon.log. See infra/homebrew/README.md.
class MacProviderDaemon < Formula
  desc "Serve an mlx-lm model from this Mac to the Mac Provider pool"
  homepage "https://github.com/mac-provider/mac-provider"
  url "https://github.com/mac-provider/mac-provider/archive/refs/tags/v0.1.0.tar.gz"
  # Filled in by the release script from the tarball above.
  sha256 "0000000000000000000000000000000000000000000000000000000000000000"
  license "Apache-2.0"
  head "https://github.com/mac-provider/mac-provider.git", branch: "main"

  # mlx needs Apple silicon and Metal.
  depends_on arch: :arm64
  depends_on :macos
  depends_on "python@3.12"

  def install
    # mlx, mlx-lm and the tokenizers ship as wheels: a private virtualenv under libexec
    # keeps them away from any other Python on the machine.
    python = Formula["python@3.12"].opt_bin/"python3.12"
    system python, "-m", "venv", libexec
    system libexec/"bin/python", "-m", "pip", "install", "--no-cache-dir", "--upgrade", "pip"
    system libexec/"bin/python", "-m", "pip", "install", "--no-cache-dir", buildpath
    bin.install_symlink libexec/"bin/mac-provider-daemon"

    # The owner's configuration: installed once, never overwritten by an upgrade.
    (etc/"mac-provider").mkpath
    config = etc/"mac-provider/daemon.env"
    # It may hold secrets (a provider token, NATS credentials): private to the owner from its creation.
    unless config.exist?
      File.open(config, File::WRONLY | File::CREAT | File::EXCL, 0600) do |f|
        f.write((buildpath/"infra/homebrew/daemon.env").read)
      end
    end
  end

  def post_install
    (var/"log").mkpath
    (var/"mac-provider").mkpath
  end

  def caveats
    <<~EOS
      Two steps to join the pool:
        1. Sign this Mac in (approve the code it prints in your browser, signed in with GitHub):
             mac-provider-daemon login --config #{etc}/mac-provider/daemon.env --url https://<the pool>
        2. Start it:
             brew services start mac-provider-daemon
      The provider token goes to your login keychain; revoke it on your account page.
      Model folder, slots, memory budget and idle unload are in:
        #{etc}/mac-provider/daemon.env
      Check the machine and the configuration:
        mac-provider-daemon doctor --config #{etc}/mac-provider/daemon.env
      Local APIs, on 127.0.0.1 only: OpenAI-compatible on :11440, admin on :11441
      (admin token: ~/Library/Application Support/mac-provider/admin-token).
      Prompts you serve are processed as plaintext on this Mac.
    EOS
  end

  service do
    run [opt_bin/"mac-provider-daemon", "serve", "--config", etc/"mac-provider/daemon.env"]
    # Restarted when it crashes or exits with an error; `brew services stop` stays stopped.
    keep_alive successful_exit: false
    working_dir var/"mac-provider"
    log_path var/"log/mac-provider-daemon.log"
    error_log_path var/"log/mac-provider-daemon.log"
    environment_variables PATH: std_service_path_env, PYTHONUNBUFFERED: "1"
    # On `brew services stop` launchd sends SIGTERM and kills 20 s later: the daemon drains
    # in-flight requests for at most MP_DRAIN_TIMEOUT_S (15 s), leaves the pool and exits first.
  end

  test do
    assert_match "doctor", shell_output("#{bin}/mac-provider-daemon --help")
    (testpath/"daemon.env").write "MP_SLOTS=2\nMP_ADMIN_PORT=0\nMP_API_PORT=0\nNATS_URL=nats://127.0.0.1:1\n"
    output = shell_output("#{bin}/mac-provider-daemon doctor --json --config #{testpath}/daemon.env", 1)
    assert_match "\"pool\"", output
  end
end
