import Foundation
import Testing

@testable import PayopIPND

@Suite struct ConfigTests {
    func problems(_ yaml: String) -> [ConfigProblem] {
        do {
            return try ConfigLoader.parse(yaml, environment: [:]).warnings
        } catch {
            return error.problems
        }
    }

    @Test func emptyConfigGetsTheDesignDefaults() throws {
        let config = try ConfigLoader.parse("{}", environment: [:]).config
        #expect(config.server.listen == ListenAddress(host: "0.0.0.0", port: 8080))
        #expect(config.server.ipnPaths == ["/payop/ipn"])
        #expect(config.server.maxBodyBytes == 65536)
        #expect(config.admin.listen.description == "127.0.0.1:9181")
        #expect(config.storage.path == "/var/lib/payop-ipnd/events.sqlite3")
        #expect(config.storage.retentionDays == 400)
        #expect(config.payop.apiBaseURL == "https://api.payop.com")
        #expect(config.reconcile.intervalSeconds == 300)
        #expect(config.delivery.retryMaxSeconds == 10800)
        guard case .only(let ranges) = config.server.allowedSources else {
            Issue.record("the default source policy is not Payop's addresses")
            return
        }
        #expect(ranges.count == 6)
    }

    @Test func typoedKeyIsRejectedNamingTheKeyAndLine() {
        let found = problems(
            """
            server:
              listen: 0.0.0.0:8080
              max_body_byte: 100
            """)
        let problem = found.first { $0.severity == .error }
        #expect(problem?.key == "server.max_body_byte")
        #expect(problem?.line == 3)
        #expect(problem?.message.contains("did you mean max_body_bytes") == true)
    }

    @Test func everyProblemIsReportedNotJustTheFirst() {
        let found = problems(
            """
            server:
              listen: nowhere
              allowed_sources: [10.0.0.0/8, 300.1.1.1/8]
            storage:
              retention_days: 0
            colour: blue
            """
        ).filter { $0.severity == .error }
        #expect(Set(found.map(\.key)) == ["server.listen", "server.allowed_sources[1]", "storage.retention_days", "colour"])
    }

    @Test func aReadTimeoutTooShortForAnyRequestToArriveIsRefused() throws {
        let found = problems(
            """
            server:
              read_timeout_seconds: 0.0005
            """
        ).filter { $0.severity == .error }
        #expect(found.map(\.key) == ["server.read_timeout_seconds"])
        #expect(found.first?.message == "must be at least 0.1")
        #expect(try ConfigLoader.parse("server:\n  read_timeout_seconds: 0.1\n", environment: [:]).config.server.readTimeoutSeconds == 0.1)
    }

    @Test func intervalsThatWouldKeepTheDaemonBusyAreRefusedWithTheirFloor() throws {
        let found = problems(
            """
            reconcile:
              interval_seconds: 0.001
            payop:
              retry_initial_seconds: 0.01
              retry_max_seconds: 0.001
            delivery:
              retry_initial_seconds: 0.05
              retry_max_seconds: 0.02
            """
        ).filter { $0.severity == .error }
        let messages = Dictionary(found.map { ($0.key, $0.message) }, uniquingKeysWith: { first, _ in first })
        #expect(found.count == 5)
        // The cap bounds every delay (Backoff), so it has the same floor as the first delay.
        #expect(messages["payop.retry_max_seconds"] == "must be at least 0.1")
        #expect(messages["delivery.retry_max_seconds"] == "must be at least 0.1")
        #expect(messages["reconcile.interval_seconds"] == "must be at least 1")
        #expect(messages["payop.retry_initial_seconds"] == "must be at least 0.1")
        #expect(messages["delivery.retry_initial_seconds"] == "must be at least 0.1")
        let floors = try ConfigLoader.parse(
            """
            reconcile:
              interval_seconds: 1
            payop:
              retry_initial_seconds: 0.1
            delivery:
              retry_initial_seconds: 0.1
            """, environment: [:]
        ).config
        #expect(floors.reconcile.intervalSeconds == 1 && floors.payop.retryInitialSeconds == 0.1)
        #expect(floors.delivery.retryInitialSeconds == 0.1)
    }

    @Test func consoleReachableFromOtherMachinesNeedsATokenFile() throws {
        let found = problems(
            """
            admin:
              listen: 0.0.0.0:9181
            """
        ).filter { $0.severity == .error }
        #expect(found.map(\.key) == ["admin.listen"])
        #expect(found.first?.message.contains("set admin.token_file") == true)
        #expect(problems("admin:\n  listen: '[::1]:9181'").filter { $0.severity == .error }.isEmpty)

        let dir = try TemporaryDirectory()
        let tokenFile = dir.file("admin-token")
        try "short\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        chmod(tokenFile, 0o600)
        let config = try ConfigLoader.parse("admin:\n  listen: 0.0.0.0:9181\n  token_file: \(tokenFile)\n", environment: [:]).config
        #expect(config.admin.tokenFile == tokenFile)
        #expect(throws: ConfigError.self) { try Secrets.load(config) }
        try "a-token-long-enough-to-resist\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        #expect(try Secrets.load(config).adminToken.get() == "a-token-long-enough-to-resist")
    }

    @Test func ipv6ListenAndCIDRsAreAccepted() throws {
        let config = try ConfigLoader.parse(
            """
            server:
              listen: "[::]:8443"
              allowed_sources: [2001:db8::/32, 3.125.109.58]
              trusted_proxies: [127.0.0.1/32, "::1"]
            """, environment: [:]
        ).config
        #expect(config.server.listen == ListenAddress(host: "::", port: 8443))
        #expect(config.server.trustedProxies.count == 2)
    }

    @Test func missingSecretFileIsAnError() {
        let found = problems("payop:\n  secret_key_file: /nonexistent/payop-secret\n")
        #expect(found.contains { $0.key == "payop.secret_key_file" && $0.severity == .error && $0.line == 2 })
    }

    @Test func worldReadableSecretIsAnErrorAndGroupReadableAWarning() throws {
        let dir = try TemporaryDirectory()
        let open = try dir.write("open", "secret\n", mode: 0o644)
        let group = try dir.write("group", "secret\n", mode: 0o640)
        let found = problems("payop:\n  jwt_file: \(open)\n  secret_key_file: \(group)\n")
        #expect(found.contains { $0.key == "payop.jwt_file" && $0.severity == .error && $0.message.contains("chmod 600") })
        #expect(found.contains { $0.key == "payop.secret_key_file" && $0.severity == .warning })
    }

    @Test func bareSecretNameIsLookedUpInTheCredentialsDirectory() throws {
        let dir = try TemporaryDirectory()
        _ = try dir.write("payop-jwt", "token\n")
        let config = try ConfigLoader.parse(
            "payop:\n  jwt_file: payop-jwt\n", environment: ["CREDENTIALS_DIRECTORY": dir.path]
        ).config
        #expect(config.payop.jwtFile == dir.file("payop-jwt"))
        #expect(try SecretFile.read(dir.file("payop-jwt")) == "token")
    }

    @Test func hooksAreValidated() throws {
        let found = problems(
            """
            hooks:
              - name: fulfil
                command: [relative/script]
                events: [checkout.accepted]
              - name: crm
                url: http://10.0.0.5:3000/payop
                events: ["*"]
              - name: both
                command: [/bin/true]
                url: http://127.0.0.1:1/x
                events: ["*"]
              - name: noevents
                command: [/bin/true]
              - name: forever
                command: [/bin/true]
                events: ["*"]
                timeout_seconds: 1e16
            delivery:
              kill_grace_seconds: 1e300
            """
        ).filter { $0.severity == .error }
        // Past a year: a count of milliseconds that would not fit, refused before any run could trap on it.
        #expect(found.contains { $0.key == "hooks[forever].timeout_seconds" && $0.message.contains("at most") })
        #expect(found.contains { $0.key == "delivery.kill_grace_seconds" && $0.message.contains("at most") })
        #expect(found.contains { $0.key == "hooks[fulfil].command" && $0.message.contains("absolute") })
        #expect(found.contains { $0.key == "hooks[crm].url" && $0.message.contains("127.0.0.1") })
        #expect(found.contains { $0.key == "hooks[both]" })
        #expect(found.contains { $0.key == "hooks[noevents].events" })
    }

    @Test func goodHooksGetTheirDefaults() throws {
        let config = try ConfigLoader.parse(
            """
            hooks:
              - name: fulfil
                command: [/bin/true, --from-payop]
                events: [checkout.accepted]
              - name: crm
                url: http://[::1]:3000/payop
                events: ["checkout.*"]
            """, environment: [:]
        ).config
        #expect(config.hooks.map(\.timeoutSeconds) == [30, 10])
        #expect(config.hooks.map(\.maxAttempts) == [30, 30])
        #expect(config.hooks[1].matches(type: "checkout.pending"))
        #expect(!config.hooks[1].matches(type: "refund.accepted"))
        #expect(!config.hooks[0].matches(type: "checkout.pending"))
    }

    @Test func hookURLsAreLoopbackOrUnixSocketsOnly() throws {
        #expect(
            try HookURL.parse("http+unix://%2Frun%2Fshop.sock/payop").get()
                == .unixSocket(path: "/run/shop.sock", requestPath: "/payop"))
        #expect(try HookURL.parse("http://localhost:3000/x").get() == .loopback(host: "localhost", port: 3000, path: "/x"))
        #expect((try? HookURL.parse("https://127.0.0.1:3000/x").get()) == nil)
        #expect((try? HookURL.parse("http://example.com:80/x").get()) == nil)
        #expect((try? HookURL.parse("http://127.0.0.1/x").get()) == nil)
    }

    @Test func exampleConfigInTheRepositoryIsValidApartFromItsSecretFiles() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("config/payop-ipnd.example.yaml")
        let text = try String(contentsOf: url, encoding: .utf8)
        let errors = problems(text).filter { $0.severity == .error }
        // Only the files a real installation provides may be missing here.
        #expect(errors.allSatisfy { $0.message.contains("does not exist") }, "\(errors)")
        #expect(!errors.isEmpty)
    }

    @Test func aPostgreSQLLogIsConfiguredByURLNodeIDPoolAndLease() throws {
        let config = try ConfigLoader.parse(
            """
            storage:
              backend: postgresql
              url: postgres://payop@db.internal:6432/payop?sslmode=verify-ca
              node_id: shop-2
              pool_size: 12
              lease_seconds: 30
            """, environment: [:]
        ).config
        #expect(config.storage.backend == .postgresql && config.storage.nodeID == "shop-2")
        let postgres = try config.storage.postgres(password: "pw")
        #expect(postgres.host == "db.internal" && postgres.port == 6432 && postgres.database == "payop")
        #expect(postgres.username == "payop" && postgres.password == "pw" && postgres.tls == .verifyCA)
        #expect(postgres.poolSize == 12 && postgres.deliveryLeaseMilliseconds == 30_000)
        #expect(postgres.checkLeaseMilliseconds == 60_000 && postgres.nodeID == "shop-2")
        #expect(postgres.displayName == "db.internal:6432/payop")
        // TLS is verified unless the URL says otherwise; the node id defaults to the host name.
        let plain = try ConfigLoader.parse(
            "storage: {backend: postgresql, url: 'postgres://u@h/d'}", environment: [:]
        ).config.storage
        #expect(try plain.postgres(password: nil).tls == .verifyFull)
        #expect(plain.nodeID == DaemonConfig.Storage.hostName && !plain.nodeID.isEmpty)
    }

    @Test func aPostgreSQLLogWithoutUsableSettingsIsRefusedKeyByKey() {
        let missing = problems("storage: {backend: postgresql}").filter { $0.severity == .error }
        #expect(missing.map(\.key) == ["storage.url"])
        let found = problems(
            """
            storage:
              backend: postgres
            """
        ).filter { $0.severity == .error }
        #expect(found.map(\.key) == ["storage.backend"])
        let bad = problems(
            """
            storage:
              backend: postgresql
              url: postgres://payop:hunter2@db/payop
              node_id: "shop 1"
              pool_size: 1
              lease_seconds: 5
            """
        ).filter { $0.severity == .error }
        #expect(
            Set(bad.map(\.key))
                == ["storage.url", "storage.node_id", "storage.pool_size", "storage.lease_seconds"])
        #expect(bad.first { $0.key == "storage.url" }?.message.contains("password_file") == true)
        #expect(!bad.contains { $0.message.contains("hunter2") })
        let sslmode = problems("storage: {backend: postgresql, url: 'postgres://u@h/d?sslmode=maybe'}")
        #expect(sslmode.contains { $0.key == "storage.url" && $0.message.contains("verify-full") })
    }

    @Test func postgreSQLKeysOnAnSQLiteLogAreNamedAsIgnored() {
        let found = problems("storage: {url: 'postgres://u@h/d', node_id: a}")
        #expect(found.allSatisfy { $0.severity == .warning })
        #expect(Set(found.map(\.key)).isSuperset(of: ["storage.url", "storage.node_id"]))
    }

    @Test func anUncheckedCertificateToAnotherHostIsWarnedAboutAndAPrivateCAIsTaken() throws {
        let remote = problems("storage: {backend: postgresql, url: 'postgres://u@db.internal/d?sslmode=require', node_id: a}")
        #expect(remote.contains { $0.severity == .warning && $0.key == "storage.url" && $0.message.contains("password") })
        let local = problems("storage: {backend: postgresql, url: 'postgres://u@127.0.0.1/d?sslmode=disable', node_id: a}")
        #expect(!local.contains { $0.key == "storage.url" })
        let relative = problems("storage: {backend: postgresql, url: 'postgres://u@h/d?sslrootcert=ca.pem', node_id: a}")
        #expect(relative.contains { $0.severity == .error && $0.message.contains("absolute path") })
        let dir = try TemporaryDirectory()
        let ca = try dir.write("ca.pem", "-----BEGIN CERTIFICATE-----\n", mode: 0o644)
        let storage = try ConfigLoader.parse(
            "storage: {backend: postgresql, url: 'postgres://u@h/d?sslrootcert=\(ca)', node_id: a}", environment: [:]
        ).config.storage
        #expect(try storage.postgres(password: nil).rootCertificateFile == ca)
    }
}
