// JDBC compatibility checks (issue 6) with Debian's libpostgresql-jdbc-java: run by
// scripts/compat.sh (direct, operator key, development key) and by tests/it/compat.rs in CI.
//
//   javac -cp /usr/share/java/postgresql.jar -d OUT Compat.java
//   java -cp /usr/share/java/postgresql.jar:OUT Compat HOST PORT DATABASE USER PASSWORD [TABLE]
//
// Prints one line per named check, `PASS name`, `FAIL name: reason` or `SKIP name: reason`, then
// `N passed, N failed, N skipped`; the exit code is 1 when a check failed.

import java.math.BigDecimal;
import java.io.ByteArrayInputStream;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;
import java.sql.*;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.TimeUnit;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class Compat {
    interface Check {
        void run() throws Exception;
    }

    static int passed = 0, failed = 0, skipped = 0;
    static String url, user, password, table;

    static Connection connect(String extra) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", user);
        p.setProperty("password", password);
        p.setProperty("sslmode", "prefer");
        p.setProperty("prepareThreshold", "1");
        p.setProperty("binaryTransfer", "true");
        p.setProperty("ApplicationName", "struere-compat-jdbc");
        p.setProperty("connectTimeout", "10");
        p.setProperty("socketTimeout", "60");
        return DriverManager.getConnection(url + extra, p);
    }

    static void check(String name, Check c) {
        try {
            c.run();
            passed++;
            System.out.println("PASS " + name);
        } catch (Throwable e) {
            failed++;
            String state = e instanceof SQLException ? " [" + ((SQLException) e).getSQLState() + "]" : "";
            System.out.println("FAIL " + name + ": " + e.getClass().getSimpleName() + state + ": "
                    + String.valueOf(e.getMessage()).replace('\n', ' '));
        }
    }

    static void expect(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 5) {
            System.err.println("usage: Compat HOST PORT DATABASE USER PASSWORD [TABLE]");
            System.exit(2);
        }
        url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[2];
        user = args[3];
        password = args[4];
        table = args.length > 5 ? args[5].toLowerCase() : "compat_jdbc";
        String t = table;

        try (Connection c = connect("")) {
            check("connect_and_metadata_version", () -> {
                DatabaseMetaData md = c.getMetaData();
                expect(md.getDatabaseMajorVersion() >= 10, "server version " + md.getDatabaseProductVersion());
                expect(c.getSchema() != null, "current schema");
            });

            check("ddl", () -> {
                try (Statement s = c.createStatement()) {
                    s.execute("DROP TABLE IF EXISTS " + t);
                    s.execute("CREATE TABLE " + t + " (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,3),"
                            + " at timestamptz, payload bytea, uid uuid, nums int[], flag boolean, doc jsonb)");
                }
            });

            check("batch_insert", () -> {
                try (PreparedStatement ps = c.prepareStatement(
                        "INSERT INTO " + t + " (id, name, amount, flag) VALUES (?, ?, ?, ?)")) {
                    for (int i = 1; i <= 200; i++) {
                        ps.setLong(1, i);
                        ps.setString(2, "row " + i);
                        ps.setBigDecimal(3, new BigDecimal(i).movePointLeft(1));
                        ps.setBoolean(4, i % 2 == 0);
                        ps.addBatch();
                    }
                    int[] counts = ps.executeBatch();
                    expect(counts.length == 200, "batch counts " + counts.length);
                }
                try (Statement s = c.createStatement()) {
                    s.addBatch("UPDATE " + t + " SET name = name || '!' WHERE id = 1");
                    s.addBatch("UPDATE " + t + " SET name = name || '!' WHERE id = 2");
                    s.addBatch("DELETE FROM " + t + " WHERE id = 200");
                    int[] counts = s.executeBatch();
                    expect(counts.length == 3 && counts[2] == 1, "statement batch");
                }
            });

            check("named_prepared_binary_roundtrip", () -> {
                byte[] bytes = new byte[] {0, 1, 2, (byte) 0xff, 39, 92};
                UUID uid = UUID.randomUUID();
                OffsetDateTime at = OffsetDateTime.of(2024, 2, 29, 12, 30, 45, 123456000, ZoneOffset.UTC);
                try (PreparedStatement ps = c.prepareStatement(
                        "UPDATE " + t + " SET payload = ?, uid = ?, at = ?, nums = ?, doc = ?::jsonb WHERE id = ?")) {
                    for (int round = 0; round < 3; round++) {
                        ps.setBytes(1, bytes);
                        ps.setObject(2, uid);
                        ps.setObject(3, at);
                        ps.setArray(4, c.createArrayOf("int4", new Integer[] {1, 2, round}));
                        ps.setString(5, "{\"k\": \"it's\"}");
                        ps.setLong(6, 10 + round);
                        expect(ps.executeUpdate() == 1, "update count");
                    }
                }
                try (PreparedStatement ps = c.prepareStatement(
                        "SELECT payload, uid, at, nums, amount, doc->>'k', flag FROM " + t + " WHERE id = ?")) {
                    for (int round = 0; round < 3; round++) {
                        ps.setLong(1, 10 + round);
                        try (ResultSet rs = ps.executeQuery()) {
                            expect(rs.next(), "row");
                            expect(java.util.Arrays.equals(rs.getBytes(1), bytes), "bytea");
                            expect(uid.equals(rs.getObject(2)), "uuid");
                            expect(at.isEqual(rs.getObject(3, OffsetDateTime.class)), "timestamptz " + rs.getString(3));
                            Integer[] nums = (Integer[]) rs.getArray(4).getArray();
                            expect(nums.length == 3 && nums[2] == round, "int[]");
                            expect(rs.getBigDecimal(5).compareTo(new BigDecimal("1.0").add(new BigDecimal(round).movePointLeft(1))) == 0,
                                    "numeric " + rs.getBigDecimal(5));
                            expect("it's".equals(rs.getString(6)), "jsonb");
                            expect(rs.getBoolean(7) == ((10 + round) % 2 == 0), "bool");
                        }
                    }
                }
            });

            check("parameter_and_result_metadata", () -> {
                try (PreparedStatement ps = c.prepareStatement("SELECT id, name FROM " + t + " WHERE id = ? AND name <> ?")) {
                    ParameterMetaData pm = ps.getParameterMetaData();
                    expect(pm.getParameterCount() == 2, "parameter count");
                    ResultSetMetaData rm = ps.getMetaData();
                    expect(rm.getColumnCount() == 2 && rm.getColumnName(2).equals("name"), "result metadata");
                }
            });

            check("generated_keys", () -> {
                try (PreparedStatement ps = c.prepareStatement(
                        "INSERT INTO " + t + " (id, name) VALUES (?, ?)", new String[] {"id"})) {
                    ps.setLong(1, 1000);
                    ps.setString(2, "generated");
                    ps.executeUpdate();
                    try (ResultSet rs = ps.getGeneratedKeys()) {
                        expect(rs.next() && rs.getLong(1) == 1000, "generated key");
                    }
                }
            });

            check("fetch_size_cursor", () -> {
                c.setAutoCommit(false);
                try (PreparedStatement ps = c.prepareStatement("SELECT id FROM " + t + " ORDER BY id")) {
                    ps.setFetchSize(7);
                    int n = 0;
                    long last = 0;
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) {
                            n++;
                            expect(rs.getLong(1) > last, "order");
                            last = rs.getLong(1);
                        }
                    }
                    expect(n == 200, "rows through the portal: " + n);
                } finally {
                    c.commit();
                    c.setAutoCommit(true);
                }
            });

            check("savepoints", () -> {
                c.setAutoCommit(false);
                try (Statement s = c.createStatement()) {
                    s.executeUpdate("INSERT INTO " + t + " (id, name) VALUES (2001, 'kept')");
                    Savepoint sp = c.setSavepoint("sp1");
                    s.executeUpdate("INSERT INTO " + t + " (id, name) VALUES (2002, 'rolled back')");
                    c.rollback(sp);
                    Savepoint sp2 = c.setSavepoint();
                    try {
                        s.executeUpdate("INSERT INTO " + t + " (id, name) VALUES (2001, 'duplicate')");
                        throw new AssertionError("duplicate key accepted");
                    } catch (SQLException e) {
                        expect("23505".equals(e.getSQLState()), "unique violation, got " + e.getSQLState());
                        c.rollback(sp2);
                    }
                    c.commit();
                    try (ResultSet rs = s.executeQuery("SELECT count(*) FROM " + t + " WHERE id IN (2001, 2002)")) {
                        rs.next();
                        expect(rs.getInt(1) == 1, "savepoint rollback: " + rs.getInt(1));
                    }
                    c.commit();
                } finally {
                    c.setAutoCommit(true);
                }
            });

            check("error_mid_batch_then_usable", () -> {
                try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + t + " (id, name) VALUES (?, ?)")) {
                    ps.setLong(1, 3001);
                    ps.setString(2, "a");
                    ps.addBatch();
                    ps.setLong(1, 1);
                    ps.setString(2, "duplicate");
                    ps.addBatch();
                    ps.setLong(1, 3002);
                    ps.setString(2, "b");
                    ps.addBatch();
                    try {
                        ps.executeBatch();
                        throw new AssertionError("batch with a duplicate key succeeded");
                    } catch (BatchUpdateException e) {
                        // expected
                    }
                }
                try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT 1")) {
                    expect(rs.next() && rs.getInt(1) == 1, "usable after the failed batch");
                }
            });

            check("transaction_isolation_and_read_only", () -> {
                c.setAutoCommit(false);
                c.setTransactionIsolation(Connection.TRANSACTION_SERIALIZABLE);
                try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SHOW transaction_isolation")) {
                    rs.next();
                    expect("serializable".equals(rs.getString(1)), "isolation " + rs.getString(1));
                }
                c.commit();
                c.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
                c.setAutoCommit(true);
                c.setReadOnly(true);
                try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT count(*) FROM " + t)) {
                    expect(rs.next(), "read-only select");
                }
                c.setReadOnly(false);
            });

            check("copy_in_and_out", () -> {
                CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
                String csv = "5001,copied one,1.5\n5002,\"copied, two\",\n";
                long n = cm.copyIn("COPY " + t + " (id, name, amount) FROM STDIN WITH (FORMAT csv)",
                        new ByteArrayInputStream(csv.getBytes(StandardCharsets.UTF_8)));
                expect(n == 2, "copied in " + n);
                StringWriter out = new StringWriter();
                long m = cm.copyOut("COPY (SELECT id, name FROM " + t + " WHERE id > 5000 ORDER BY id) TO STDOUT WITH (FORMAT csv)", out);
                expect(m == 2 && out.toString().contains("\"copied, two\""), "copied out: " + out);
            });

            check("database_metadata", () -> {
                DatabaseMetaData md = c.getMetaData();
                boolean found = false;
                try (ResultSet rs = md.getTables(null, null, t, new String[] {"TABLE"})) {
                    while (rs.next()) found |= t.equals(rs.getString("TABLE_NAME"));
                }
                expect(found, "getTables");
                int cols = 0;
                try (ResultSet rs = md.getColumns(null, null, t, "%")) {
                    while (rs.next()) cols++;
                }
                expect(cols == 9, "getColumns: " + cols);
                String pk = null;
                try (ResultSet rs = md.getPrimaryKeys(null, null, t)) {
                    if (rs.next()) pk = rs.getString("COLUMN_NAME");
                }
                expect("id".equals(pk), "getPrimaryKeys: " + pk);
                try (ResultSet rs = md.getIndexInfo(null, null, t, true, false)) {
                    expect(rs.next(), "getIndexInfo");
                }
                try (ResultSet rs = md.getSchemas()) {
                    expect(rs.next(), "getSchemas");
                }
                try (ResultSet rs = md.getTypeInfo()) {
                    expect(rs.next(), "getTypeInfo");
                }
            });

            check("listen_notify", () -> {
                try (Connection other = connect("")) {
                    try (Statement s = c.createStatement()) {
                        s.execute("LISTEN compat_jdbc_channel");
                    }
                    try (Statement s = other.createStatement()) {
                        s.execute("NOTIFY compat_jdbc_channel, 'hello'");
                    }
                    PGNotification[] got = null;
                    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
                    while ((got == null || got.length == 0) && System.nanoTime() < deadline) {
                        got = c.unwrap(PGConnection.class).getNotifications(500);
                    }
                    expect(got != null && got.length == 1, "one notification");
                    expect("compat_jdbc_channel".equals(got[0].getName()) && "hello".equals(got[0].getParameter()),
                            "notification " + got[0].getName() + " " + got[0].getParameter());
                    try (Statement s = c.createStatement()) {
                        s.execute("UNLISTEN compat_jdbc_channel");
                    }
                }
            });

            check("cancel", () -> {
                try (Statement s = c.createStatement()) {
                    Thread canceller = new Thread(() -> {
                        try {
                            Thread.sleep(700);
                            s.cancel();
                        } catch (Exception e) {
                            // the assertion below reports it
                        }
                    });
                    canceller.start();
                    long start = System.nanoTime();
                    try {
                        s.execute("SELECT pg_sleep(20)");
                        throw new AssertionError("not cancelled");
                    } catch (SQLException e) {
                        expect("57014".equals(e.getSQLState()), "query_canceled, got " + e.getSQLState() + " " + e.getMessage());
                    }
                    canceller.join();
                    expect(System.nanoTime() - start < TimeUnit.SECONDS.toNanos(10), "cancelled in time");
                }
                try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT 1")) {
                    expect(rs.next(), "usable after cancel");
                }
            });

            check("query_timeout", () -> {
                try (Statement s = c.createStatement()) {
                    s.setQueryTimeout(1);
                    try {
                        s.execute("SELECT pg_sleep(20)");
                        throw new AssertionError("no timeout");
                    } catch (SQLException e) {
                        expect("57014".equals(e.getSQLState()), "query_canceled, got " + e.getSQLState());
                    }
                }
            });

            check("unnamed_statement_reuse", () -> {
                // prepareThreshold=0 on this statement: every execution is a fresh unnamed Parse.
                try (PreparedStatement ps = c.prepareStatement("SELECT name FROM " + t + " WHERE id = ?")) {
                    ps.unwrap(org.postgresql.PGStatement.class).setPrepareThreshold(0);
                    for (int i = 1; i <= 5; i++) {
                        ps.setLong(1, i);
                        try (ResultSet rs = ps.executeQuery()) {
                            expect(rs.next() && rs.getString(1).startsWith("row " + i), "row " + i);
                        }
                    }
                }
            });

            check("drop", () -> {
                try (Statement s = c.createStatement()) {
                    s.execute("DROP TABLE " + t);
                }
            });
        } catch (SQLException e) {
            failed++;
            System.out.println("FAIL connect: [" + e.getSQLState() + "] " + e.getMessage());
        }
        System.out.println(passed + " passed, " + failed + " failed, " + skipped + " skipped");
        System.exit(failed == 0 ? 0 : 1);
    }
}
