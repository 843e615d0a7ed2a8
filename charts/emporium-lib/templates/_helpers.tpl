{{/*
Naming. Objects are named after the service (not prefixed with the release name): the Secrets the
operator writes are "<name>-db" / "<name>-amqp" and in-cluster URLs stay stable (http://products:8000).
One Emporium release per namespace.
*/}}
{{- define "emporium-lib.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "emporium-lib.fullname" -}}
{{- default (include "emporium-lib.name" .) .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "emporium-lib.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "emporium-lib.selectorLabels" -}}
app.kubernetes.io/name: {{ include "emporium-lib.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "emporium-lib.labels" -}}
{{ include "emporium-lib.commonLabels" . }}
app.kubernetes.io/component: {{ .Values.component | default "service" }}
{{- end -}}

{{/* The standard labels without app.kubernetes.io/component (for objects that set their own). */}}
{{- define "emporium-lib.commonLabels" -}}
helm.sh/chart: {{ include "emporium-lib.chart" . }}
{{ include "emporium-lib.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: emporium
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "emporium-lib.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "emporium-lib.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "emporium-lib.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Global values (set once in the umbrella chart) win over the chart's own. */}}
{{- define "emporium-lib.environment" -}}
{{- (.Values.global).environment | default .Values.environment -}}
{{- end -}}

{{- define "emporium-lib.meshEnabled" -}}
{{- $g := (.Values.global).mesh -}}
{{- if kindIs "map" $g -}}{{- ternary "true" "" (eq (toString $g.enabled) "true") -}}{{- else -}}{{- ternary "true" "" .Values.mesh.enabled -}}{{- end -}}
{{- end -}}

{{- define "emporium-lib.serviceMonitorEnabled" -}}
{{- $g := (.Values.global).monitoring -}}
{{- if kindIs "map" $g -}}{{- ternary "true" "" (and (eq (toString $g.enabled) "true") .Values.metrics.serviceMonitor.enabled) -}}{{- else -}}{{- ternary "true" "" .Values.metrics.serviceMonitor.enabled -}}{{- end -}}
{{- end -}}

{{- define "emporium-lib.postgresServer" -}}
{{- (.Values.global).postgresServer | default .Values.database.serverRef -}}
{{- end -}}

{{- define "emporium-lib.rabbitServer" -}}
{{- (.Values.global).rabbitServer | default .Values.rabbitmq.serverRef -}}
{{- end -}}

{{- define "emporium-lib.rabbitVhost" -}}
{{- (.Values.global).rabbitVhost | default .Values.rabbitmq.vhost -}}
{{- end -}}

{{- define "emporium-lib.dbSecretName" -}}
{{- printf "%s-db" (include "emporium-lib.fullname" .) -}}
{{- end -}}

{{- define "emporium-lib.amqpSecretName" -}}
{{- printf "%s-amqp" (include "emporium-lib.fullname" .) -}}
{{- end -}}

{{- define "emporium-lib.jwt" -}}
{{- $g := (.Values.global).jwt | default dict -}}
{{- $issuer := $g.issuer | default .Values.jwt.issuer -}}
{{- $audience := $g.audience | default .Values.jwt.audience -}}
{{- $jwks := $g.jwksUrl | default .Values.jwt.jwksUrl | default (printf "http://users.%s.svc.cluster.local:8000/.well-known/jwks.json" .Release.Namespace) -}}
{{- dict "issuer" $issuer "audience" $audience "jwksUrl" $jwks | toJson -}}
{{- end -}}

{{/* The environment every container of the service gets (serve and migrate). */}}
{{- define "emporium-lib.env" -}}
{{- $jwt := include "emporium-lib.jwt" . | fromJson -}}
- name: ENVIRONMENT
  value: {{ include "emporium-lib.environment" . | quote }}
- name: LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: PORT
  value: {{ .Values.containerPort | quote }}
- name: JWT_ISSUER
  value: {{ $jwt.issuer | quote }}
- name: JWT_AUDIENCE
  value: {{ $jwt.audience | quote }}
- name: JWKS_URL
  value: {{ $jwt.jwksUrl | quote }}
- name: OTEL_TRACES_EXPORTER
  value: {{ .Values.tracing.exporter | quote }}
{{- if .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.tracing.otlpEndpoint | quote }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ include "emporium-lib.fullname" . | quote }}
{{- if .Values.database.enabled }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "emporium-lib.dbSecretName" . }}
      key: DATABASE_URL
{{- end }}
{{- if .Values.rabbitmq.enabled }}
- name: AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "emporium-lib.amqpSecretName" . }}
      key: AMQP_URL
{{- end }}
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ tpl (toString $value) $ | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ tpl (toYaml .) $ }}
{{- end }}
{{- end -}}

{{- define "emporium-lib.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}
